"""Pool members that live in MLflow: record the encoding a model was trained on, and load a ``uri:`` entry.

A ``uri:`` pool entry is one of two things once its MLflow folder is downloaded:
- a built-in pool model EMM registered (``emm pretrain`` registers each as ``emm-<dataset>-<task>``): a
  JSON spec + safetensors bundle, rebuilt from the spec, nothing unpickled;
- a model logged with ``mlflow.pytorch.log_model``: its ``pickle`` format is a pickled Python object, and
  unpickling it runs whatever code the file names, including code the model carries in its ``code/``
  folder, which MLflow puts on ``sys.path``. Whoever can write to that run's artifacts, or register a
  version under that name, can run code in the EMM process. So it is loaded only with an explicit
  ``trust_pickle: true`` on the entry, and the check happens on the downloaded ``MLmodel`` file, before
  anything is unpickled. Prefer a factory + safetensors entry, which needs no such trust.

The ``pt2`` (torch.export) format is refused: its graph is flattened to aten operations with no layers
left, so decomposition could not cut it.

A model logged with ``mlflow.lightgbm`` / ``mlflow.xgboost`` is a tree member: its native text is taken from
the download (``emm.tracking.external_trees``), its encoding from the run as for a PyTorch model. A model of
any other flavour is refused, naming the flavours it has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from torch import nn

from emm.data.batches import ENCODING_FORMAT, encoding_record, read_encoding
from emm.errors import EMMError
from emm.io import sha256_file
from emm.tracking.external_trees import TreeArtifact, is_tree_model, read_tree_model
from emm.tracking.store import configure, tracking_uri

log = logging.getLogger(__name__)
FINGERPRINT_TAG = "emm.schema_fingerprint"
ENCODING_ARTIFACT = "emm/encoding.json"
POOL_BUILDER = "emm.models.pool:build_from_config"


def log_encoding(data_dir: Path | str, run_id: str | None = None) -> None:
    """Record in an MLflow run (``run_id``, else the active run) which ingested data a model was trained on:
    the tag ``emm.schema_fingerprint`` and the artifact ``emm/encoding.json`` (what the fingerprint covers,
    so a mismatch can be described)."""
    run_id = run_id or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if run_id is None:
        raise EMMError("log_encoding needs a run: call it inside `with mlflow.start_run():` or pass run_id")
    record = encoding_record(Path(data_dir))
    client = mlflow.MlflowClient()
    client.set_tag(run_id, FINGERPRINT_TAG, record["fingerprint"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoding.json"
        path.write_text(json.dumps(record, indent=2))
        client.log_artifact(run_id, str(path), artifact_path="emm")


@dataclass
class LoadedUri:
    """What a ``uri:`` entry resolved to: a torch module (``mlflow.pytorch``), an EMM spec + weights, or a tree
    model's native text (``mlflow.lightgbm`` / ``mlflow.xgboost``)."""

    resolved_uri: str
    run_id: str | None
    source_sha256: str
    encoding: dict[str, Any] | None
    encoding_where: str
    module: nn.Module | None = None
    spec: dict[str, Any] | None = None
    weights: Path | None = None
    tree: TreeArtifact | None = field(default=None, repr=False)
    folder: Path | None = field(default=None, repr=False)


def resolve(uri: str, name: str, store: Path) -> tuple[str, str | None]:
    """``uri`` -> (the exact URI to download, its run id); an alias resolves to ``models:/NAME/VERSION``.
    Errors name the entry, the URI, the registry and what is there instead."""
    configure(store)
    client = mlflow.MlflowClient()
    where = f"pool model {name!r}: uri {uri!r}"
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/", 1)[0]
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException as exc:
            raise EMMError(f"{where}: no run {run_id!r} in {tracking_uri(store)}") from exc
        return uri, run_id
    body = uri.removeprefix("models:/")
    model, alias = body.split("@", 1) if "@" in body else (body.split("/", 1)[0], None)
    try:
        registered = client.get_registered_model(model)
    except mlflow.exceptions.MlflowException as exc:
        names = sorted(m.name for m in client.search_registered_models())
        raise EMMError(f"{where}: no registered model {model!r} in {tracking_uri(store)} (registered: {names}); check "
                       "the name, or set MLFLOW_TRACKING_URI / tracking.store to the registry it is in") from exc
    try:
        version = (client.get_model_version_by_alias(model, alias) if alias
                   else client.get_model_version(model, body.split("/", 1)[1]))
    except mlflow.exceptions.MlflowException as exc:
        if alias:
            known = sorted(getattr(registered, "aliases", {}) or {})
            raise EMMError(f"{where}: {model!r} has no alias {alias!r} (aliases: {known}); set it in the MLflow UI "
                           "or name a version: models:/NAME/VERSION") from exc
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{model}'"))
        raise EMMError(f"{where}: {model!r} has no version {body.split('/', 1)[1]} (versions: {versions})") from exc
    return f"models:/{model}/{version.version}", version.run_id


@contextlib.contextmanager
def load_uri(uri: str, name: str, store: Path, *, trust_pickle: bool) -> Iterator[LoadedUri]:
    """Download and load a ``uri:`` entry (the files live until the block ends)."""
    resolved, run_id = resolve(uri, name, store)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=resolved, dst_path=tmp))
        except (mlflow.exceptions.MlflowException, OSError) as exc:
            raise EMMError(f"pool model {name!r}: cannot download {resolved} from {tracking_uri(store)}: "
                           f"{exc}") from exc
        bundle = _emm_bundle(folder)
        if bundle is not None:
            yield _load_bundle(bundle, resolved, run_id)
            return
        flavors = _flavors(folder, name, resolved)
        if is_tree_model(flavors):
            tree = read_tree_model(folder, flavors, name, resolved, trust_pickle=trust_pickle)
            encoding, where = _run_encoding(run_id)
            yield LoadedUri(resolved, run_id, sha256_file(tree.source), encoding, where, tree=tree, folder=folder)
            return
        yield _load_pytorch(folder, flavors, name, resolved, run_id, trust_pickle=trust_pickle)


def _emm_bundle(folder: Path) -> Path | None:
    """The folder of an EMM bundle (``model.json`` naming the pool builder) inside a downloaded model, if any."""
    for meta in sorted(folder.rglob("model.json")):
        try:
            if json.loads(meta.read_text()).get("builder") == POOL_BUILDER:
                return meta.parent
        except (OSError, ValueError):
            continue
    return None


def _load_bundle(bundle: Path, resolved: str, run_id: str | None) -> LoadedUri:
    from emm.data.schema import Schema  # local: only bundles carry a schema

    meta = json.loads((bundle / "model.json").read_text())
    weights = bundle / "weights.safetensors"
    encoding = encoding_record(Schema.load(bundle)) if (bundle / "schema.json").is_file() else None
    return LoadedUri(resolved, run_id, sha256_file(weights), encoding, f"schema.json of {resolved}",
                     spec=meta["config"], weights=weights, folder=bundle)


def _flavors(folder: Path, name: str, resolved: str) -> dict[str, Any]:
    from mlflow.models import Model

    try:
        return Model.load(str(folder)).flavors
    except Exception as exc:
        raise EMMError(f"pool model {name!r}: {resolved} has no readable MLmodel file ({exc})") from exc


def _load_pytorch(folder: Path, flavors: dict[str, Any], name: str, resolved: str, run_id: str | None, *,
                  trust_pickle: bool) -> LoadedUri:
    if "pytorch" not in flavors:
        raise EMMError(f"pool model {name!r}: {resolved} is neither a PyTorch nor a LightGBM / XGBoost model (flavors "
                       f"{sorted(flavors)}); log it with mlflow.pytorch.log_model, mlflow.lightgbm.log_model or "
                       "mlflow.xgboost.log_model, or use a factory + weights or a tree-file entry")
    data = folder / flavors["pytorch"].get("model_data", "data")
    pickled = data / "model.pth"
    if not pickled.is_file():
        raise EMMError(f"pool model {name!r}: {resolved} is in the pt2 (torch.export) format, whose graph is flattened "
                       "to aten operations with no layers EMM could cut; log it with serialization_format='pickle' "
                       "(and trust_pickle: true), or better save a factory + safetensors entry")
    if not trust_pickle:
        code = flavors["pytorch"].get("code")
        carries = f" that carries code ({code})" if code else ""
        raise EMMError(
            f"pool model {name!r}: {resolved} is a pickled PyTorch model{carries}. "
            "Loading it unpickles a Python object, which runs any code the file names (and puts the model's code "
            "folder on sys.path): whoever can write to that run or register that name can run code in this process. "
            "EMM loads it only with `trust_pickle: true` on this entry; the safer way is a factory + safetensors entry")
    try:
        import mlflow.pytorch

        module = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    except Exception as exc:
        raise EMMError(f"pool model {name!r}: loading {resolved} failed ({type(exc).__name__}: {exc}); the class it "
                       "was pickled from must be importable here") from exc
    if not isinstance(module, nn.Module):
        raise EMMError(f"pool model {name!r}: {resolved} holds a {type(module).__name__}, not a torch.nn.Module")
    encoding, where = _run_encoding(run_id)
    return LoadedUri(resolved, run_id, sha256_file(pickled), encoding, where, module=module.eval(), folder=folder)


def _run_encoding(run_id: str | None) -> tuple[dict[str, Any] | None, str]:
    """The encoding record of the run that logged the model: its artifact, else its fingerprint tag alone."""
    if run_id is None:
        return None, "no run"
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, ENCODING_ARTIFACT, tmp)
            return read_encoding(Path(path)), f"run {run_id} artifact {ENCODING_ARTIFACT}"
        except (mlflow.exceptions.MlflowException, OSError):
            pass
    tag = client.get_run(run_id).data.tags.get(FINGERPRINT_TAG)
    if tag:
        return {"format": ENCODING_FORMAT, "fingerprint": tag}, f"run {run_id} tag {FINGERPRINT_TAG}"
    return None, f"run {run_id} has neither tag {FINGERPRINT_TAG} nor artifact {ENCODING_ARTIFACT}"


def tag_member_version(name: str, version: str, tags: dict[str, Any]) -> None:
    """Tag a pool model's registered version (its member name, AUCs, schema fingerprint)."""
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
