"""Loading a logged EMM model for ``emm predict`` without running any code from the model folder.

Why not ``mlflow.pyfunc.load_model``: it runs what the model folder says, a ``python_model.pkl`` pickle
(models logged by EMM before models-from-code) or the folder's own copy of the code file, so a crafted
model folder could make ``emm predict`` run anything. EMM does not need the folder's code: the model
*is* its bundle (JSON, Parquet, safetensors; ``emm.tracking.pyfunc``), and ``Scorer`` rebuilds the
torch module from it through the allow-listed builders. This module downloads the model, checks that
it is an EMM pyfunc, and builds the ``Scorer`` from ``artifacts/bundle``; nothing in the folder is
imported, executed or unpickled.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import yaml

from emm.errors import EMMError
from emm.tracking.pyfunc import BUNDLE, Scorer
from emm.tracking.store import configure, tracking_uri

log = logging.getLogger(__name__)
# URI schemes a model can be addressed by (a bare path has none). Why a list: anything else either is no
# model address at all (http(s):// is a web page or a tracking server, not a model) or fails deep inside
# MLflow with a traceback that does not say what to pass instead.
SCHEMES = ("models", "runs", "file", "mlflow-artifacts")
# The pyfunc loaders EMM has logged with: models-from-code now, a pickled PythonModel before.
EMM_LOADERS = ("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
URI_HELP = ("use models:/emm-<dataset>@champion (or @challenger, or /<version>), runs:/<run id>/model, "
            "or the path of a model folder")


def check_model_uri(model_uri: str) -> None:
    """Refuse, with the forms that work, a URI that cannot name a logged model."""
    scheme = urlparse(model_uri).scheme.lower()
    if scheme in ("http", "https"):
        raise EMMError(f"--model-uri {model_uri!r} is a web address, not a model URI: {URI_HELP}. To read the "
                       f"registry of an MLflow server, set MLFLOW_TRACKING_URI={model_uri.split('/#')[0]} and "
                       f"pass a models:/ URI")
    if len(scheme) > 1 and scheme not in SCHEMES:
        raise EMMError(f"--model-uri {model_uri!r}: unsupported scheme {scheme!r}; {URI_HELP}")
    if not scheme and not Path(model_uri).exists():
        raise EMMError(f"--model-uri {model_uri!r}: no such model folder; {URI_HELP}")


def scorer_from_folder(folder: Path, model_uri: str) -> Scorer:
    """The ``Scorer`` of a downloaded model folder, after checking it is an EMM pyfunc."""
    folder = Path(folder)
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise EMMError(f"{model_uri!r} is not an MLflow model (no MLmodel file in it); {URI_HELP}")
    try:
        meta = yaml.safe_load(mlmodel.read_text()) or {}
    except yaml.YAMLError as exc:
        raise EMMError(f"{model_uri!r}: its MLmodel file is not valid YAML ({exc}); log the model again") from exc
    flavor = (meta.get("flavors") or {}).get("python_function") or {}
    if flavor.get("loader_module") not in EMM_LOADERS or not (folder / "artifacts" / BUNDLE).is_dir():
        raise EMMError(f"{model_uri!r} is not a model logged by EMM (no python_function flavour with an "
                       f"artifacts/{BUNDLE} folder); `emm predict` scores EMM models only")
    if flavor.get("python_model"):
        log.warning("%s carries a pickled python_model (%s, logged by an older EMM); it is not unpickled: "
                    "scoring from its bundle", model_uri, flavor["python_model"])
    return Scorer(folder / "artifacts" / BUNDLE)


def load_scorer(model_uri: str, store: Path) -> Scorer:
    """A logged EMM model by URI (models:/emm-<dataset>@champion, runs:/<id>/model, a folder), ready to score."""
    check_model_uri(model_uri)
    configure(store)
    with tempfile.TemporaryDirectory(prefix="emm-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError, ValueError) as exc:
            raise EMMError(f"cannot load model {model_uri!r} from {tracking_uri(store)}: {exc}") from exc
        return scorer_from_folder(Path(local), model_uri)
