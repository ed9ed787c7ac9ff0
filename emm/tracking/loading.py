"""Loading a logged EMM model for ``emm predict`` without running any code from the model folder.

Why not ``mlflow.pyfunc.load_model``: it runs what the model folder says, a ``python_model.pkl`` pickle
(models logged by EMM before models-from-code) or the folder's own copy of the code file, so a crafted
model folder could make ``emm predict`` run anything. EMM does not need the folder's code: the model
*is* its bundle (JSON, Parquet, safetensors; ``emm.tracking.scorer``), and ``Scorer`` rebuilds the
torch module from it through the allow-listed builders. This module finds the model folder, checks that
it is an EMM pyfunc, and builds the ``Scorer`` from ``artifacts/bundle``; nothing in the folder is
imported, executed or unpickled.

Why a registered version in the project's own store (SQLite, artifacts on this machine) is found without
MLflow (``registered_folder``): its folder is one row of the registry away, but MLflow's way there imports
MLflow, opens its tracking and registry stores and copies the folder, which takes several times as long as
scoring a few rows. So that case reads the two rows MLflow itself would read (the alias or version, and that
version's storage location), read-only, with the same conditions, and scores the folder where it lies. Every
other case (another kind of store or URI, a workspace, a lookup that finds nothing or an unexpected database)
goes through MLflow as before, so what fails fails with MLflow's own message.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from emm.errors import EMMError
from emm.tracking.scorer import BUNDLE, Scorer
from emm.tracking.store import configure, tracking_uri

log = logging.getLogger(__name__)
# URI schemes a model can be addressed by (a bare path has none). Why a list: anything else either is no
# model address at all (http(s):// is a web page or a tracking server, not a model) or fails deep inside
# MLflow with a traceback that does not say what to pass instead.
SCHEMES = ("models", "runs", "file", "mlflow-artifacts")
# The pyfunc loaders EMM has logged with: models-from-code now, a pickled PythonModel before.
EMM_LOADERS = ("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
# models:/<name>@<alias> and models:/<name>/<version>: the registered versions ``registered_folder`` looks up
REGISTERED_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[1-9][0-9]*))")
# What MLflow's SQL registry reads for an alias or a version (its SqlAlchemyStore: get_model_version_by_alias,
# get_model_version_download_uri): the version in the default workspace, unless deleted; storage location first.
DELETED_STAGE = "Deleted_Internal"
DEFAULT_WORKSPACE = "default"
BY_ALIAS = ("SELECT v.storage_location, v.source FROM registered_model_aliases a JOIN model_versions v "
            "ON v.workspace = a.workspace AND v.name = a.name AND v.version = a.version "
            "WHERE a.workspace = ? AND a.name = ? AND a.alias = ? AND v.current_stage != ?")
BY_VERSION = ("SELECT storage_location, source FROM model_versions "
              "WHERE workspace = ? AND name = ? AND version = ? AND current_stage != ?")
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
    """The ``Scorer`` of a model folder (MLflow's download, or the registry's own), after checking it is an EMM
    pyfunc."""
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


def _local_folder(location: str | None) -> Path | None:
    """The local folder an artifact location names (a file:// URI or a plain path), if it is one."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path))
    return Path(location) if not parsed.scheme and Path(location).is_absolute() else None


def registered_folder(model_uri: str, registry_uri: str) -> Path | None:
    """The model folder of ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` in a local SQLite registry
    whose artifacts are on this machine, read straight from the database; None when MLflow must resolve it
    (see the module doc): another URI or store, a workspace set, no such alias or version, any database error."""
    found = REGISTERED_URI.fullmatch(model_uri)
    if (found is None or not registry_uri.startswith("sqlite:///") or "?" in registry_uri
            or (found["alias"] or "").lower() == "latest" or os.environ.get("MLFLOW_WORKSPACE", "").strip()):
        return None  # "latest" is no alias but MLflow's newest version: MLflow's lookup
    database = Path(registry_uri[len("sqlite:///"):])
    if not database.is_file():
        return None
    name, alias, version = found["name"], found["alias"], found["version"]
    query, args = ((BY_ALIAS, (DEFAULT_WORKSPACE, name, alias, DELETED_STAGE)) if alias else
                   (BY_VERSION, (DEFAULT_WORKSPACE, name, int(version), DELETED_STAGE)))
    try:
        connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = connection.execute(query, args).fetchall()
        finally:
            connection.close()
    except sqlite3.Error:  # not MLflow's schema as we know it, locked, ...: MLflow's lookup says what is wrong
        return None
    if len(rows) != 1:
        return None
    folder = _local_folder(rows[0][0] or rows[0][1])
    return folder if folder is not None and (folder / "MLmodel").is_file() else None


def load_scorer(model_uri: str, store: Path) -> Scorer:
    """A logged EMM model by URI (models:/emm-<dataset>@champion, runs:/<id>/model, a folder), ready to score."""
    check_model_uri(model_uri)
    folder = registered_folder(model_uri, tracking_uri(store))
    if folder is not None:
        return scorer_from_folder(folder, model_uri)
    import mlflow  # here: only a model that is not a local registered version needs MLflow to find it

    configure(store)
    with tempfile.TemporaryDirectory(prefix="emm-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        except (mlflow.exceptions.MlflowException, OSError, ValueError) as exc:
            raise EMMError(f"cannot load model {model_uri!r} from {tracking_uri(store)}: {exc}") from exc
        return scorer_from_folder(Path(local), model_uri)
