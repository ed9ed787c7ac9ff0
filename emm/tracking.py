"""Where do runs and models go? MLflow, and only this module imports it.

- Store: ``sqlite:///<tracking.store>/mlflow.db`` (runs, registry, aliases) with artifacts under
  ``<tracking.store>/artifacts``; ``MLFLOW_TRACKING_URI`` wins when set.
- Experiments: one per dataset, ``emm-<dataset>``.
- Models are logged as an MLflow *pyfunc* that rebuilds the torch module from a JSON spec and a
  safetensors file (no pickled module), and scores raw feature rows: the same encoder as ingestion maps
  values to indices (unseen -> reserved 0), so ``mlflow.pyfunc.load_model(uri).predict(df)`` returns one
  probability column per task.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

from emm.errors import EMMError

log = logging.getLogger(__name__)
PIP_REQUIREMENTS = ["torch", "pandas", "pyarrow", "safetensors", "scikit-learn", "pydantic"]


def tracking_uri(store: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def configure(store: Path) -> str:
    """Point MLflow at the project's store (created on first use)."""
    uri = tracking_uri(store)
    if uri.startswith("sqlite:///"):
        Path(store).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return uri


_EXPERIMENT_LOCK = threading.Lock()


def use_experiment(dataset: str, store: Path) -> str:
    """Create (once) and select the experiment ``emm-<dataset>``; artifacts go under the store.

    Locked: concurrent pool trainings (threads) must not both try to create the experiment."""
    with _EXPERIMENT_LOCK:
        configure(store)
        name = f"emm-{dataset}"
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            location = (Path(store).resolve() / "artifacts").as_uri()
            exp_id = mlflow.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
        return exp_id


@contextlib.contextmanager
def run(name: str, *, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> Iterator[str]:
    """A run, nested under the active run if any, else under ``parent_run_id`` (e.g. from another process)."""
    tags = dict(tags or {})
    nested = mlflow.active_run() is not None
    if not nested and parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=name, nested=nested, tags=tags or None) as active:
        yield active.info.run_id


@contextlib.contextmanager
def reopen_run(run_id: str | None, name: str) -> Iterator[str]:
    """Continue an earlier run (e.g. the fuse run, to add evaluation and the model), or start one."""
    if run_id:
        with mlflow.start_run(run_id=run_id) as active:
            yield active.info.run_id
    else:
        with run(name) as new_id:
            yield new_id


# ---- runs addressed by id (no fluent active-run stack): parents of runs made in other threads ------------------
def start_detached_run(dataset: str, store: Path, name: str, *, tags: dict[str, str] | None = None,
                       params: dict[str, Any] | None = None) -> str:
    """Create a RUNNING run in ``emm-<dataset>`` and return its id without making it the active run.

    Why: the fluent API keeps one active-run stack per thread, so a parent opened with ``run()`` in the
    flow's thread is invisible to pool members training in worker threads. They nest under it through
    ``run(name, parent_run_id=...)`` instead, and this run is ended with ``end_detached_run``.
    """
    exp_id = use_experiment(dataset, store)
    client = mlflow.MlflowClient()
    created = client.create_run(exp_id, run_name=name, tags=dict(tags or {}))
    for key, value in (params or {}).items():
        client.log_param(created.info.run_id, key, json.dumps(value) if isinstance(value, (list, dict)) else value)
    return created.info.run_id


def end_detached_run(run_id: str, store: Path, *, metrics: dict[str, float] | None = None,
                     status: str = "FINISHED") -> None:
    """Log final metrics to a run made by ``start_detached_run`` and end it (FINISHED or FAILED)."""
    configure(store)
    client = mlflow.MlflowClient()
    for key, value in (metrics or {}).items():
        if value is not None and np.isfinite(value):
            client.log_metric(run_id, key, float(value))
    if client.get_run(run_id).info.status == "RUNNING":  # a reused (cached) parent keeps its first ending
        client.set_terminated(run_id, status=status)


def child_runs(dataset: str, store: Path, parent_run_id: str) -> list[dict[str, str]]:
    """Name, status and parent of every run nested under ``parent_run_id`` (for checks and reports)."""
    configure(store)
    exp = mlflow.get_experiment_by_name(registered_name(dataset))
    if exp is None:
        return []
    runs = mlflow.MlflowClient().search_runs([exp.experiment_id],
                                             filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "parent": r.data.tags.get("mlflow.parentRunId", "")} for r in runs]


def model_version_exists(dataset: str, store: Path, version: str | None) -> bool:
    """Whether ``emm-<dataset>`` still has ``version`` in the registry (a cached registration is void if not)."""
    if not version:
        return False
    configure(store)
    try:
        mlflow.MlflowClient().get_model_version(registered_name(dataset), str(version))
    except mlflow.exceptions.MlflowException:
        return False
    return True


def is_transient(exc: BaseException) -> bool:
    """Whether an error may pass on a retry: network/OS trouble, a locked SQLite store, a 5xx/429 from a
    tracking server. Never an EMMError (a user's mistake fails the same way every time).
    """
    if isinstance(exc, (EMMError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return True
    text = str(exc).lower()
    if "database is locked" in text or "temporarily unavailable" in text:
        return True
    if isinstance(exc, mlflow.exceptions.MlflowException):
        return exc.error_code in {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED",
                                  "RESOURCE_EXHAUSTED"}
    return False


def log_params(params: dict[str, Any]) -> None:
    flat = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()}
    mlflow.log_params(flat)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    mlflow.log_metrics(clean, step=step)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


# ---- the pyfunc model -------------------------------------------------------------------------------------
class EMMScorer(mlflow.pyfunc.PythonModel):
    """Raw feature rows -> one probability column per task, rebuilt from spec + safetensors."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's type
        from emm.data.encoding import Encoder
        from emm.data.schema import Schema
        from emm.weights import load_module

        folder = Path(context.artifacts["bundle"])
        meta = json.loads((folder / "model.json").read_text())
        self.schema = Schema.load(folder)
        self.encoder = Encoder.load(folder, self.schema)
        module_name, fn_name = meta["builder"].split(":")
        builder = getattr(importlib.import_module(module_name), fn_name)
        self.model = builder(meta["config"], self.schema)
        load_module(self.model, folder / "weights.safetensors", what="logged model", fix="log the model again")
        self.model.eval()
        self.outputs = meta["outputs"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: ANN001
        from emm.data.tensors import frame_to_tensors
        from emm.train.trainer import predict_proba

        encoded = self.encoder.transform(model_input, source="model input", first_line=None)
        tensors = frame_to_tensors(encoded, self.schema, with_labels=False)
        probs = predict_proba(self.model, tensors)
        return pd.DataFrame(probs, columns=[f"score_{t}" for t in self.outputs])


def write_bundle(folder: Path, *, builder: str, config: dict[str, Any], outputs: list[str],
                 weights: Path, data_dir: Path) -> None:
    """Everything the pyfunc needs: model.json, weights.safetensors (a copy of ``weights``),
    schema.json and vocabulary.parquet."""
    from emm.data.schema import SCHEMA_FILE, VOCAB_FILE

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps({"builder": builder, "config": config, "outputs": outputs},
                                                  indent=2))
    shutil.copyfile(weights, folder / "weights.safetensors")
    for name in (SCHEMA_FILE, VOCAB_FILE):
        shutil.copyfile(Path(data_dir) / name, folder / name)


def log_scorer(name: str, *, builder: str, config: dict[str, Any], outputs: list[str], weights: Path,
               data_dir: Path, input_example: pd.DataFrame, registered_name: str | None = None):
    """Log an EMMScorer pyfunc with signature and input example; optionally register a new version."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        write_bundle(bundle, builder=builder, config=config, outputs=outputs, weights=weights,
                     data_dir=data_dir)
        scorer = EMMScorer()
        scorer.load_context(type("Ctx", (), {"artifacts": {"bundle": str(bundle)}})())
        output_example = scorer.predict(None, input_example)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=scorer, artifacts={"bundle": str(bundle)},
            signature=infer_signature(input_example, output_example), input_example=input_example,
            pip_requirements=PIP_REQUIREMENTS, registered_model_name=registered_name,
        )
    return info


def raw_example(data_dir: Path, split: str = "test", rows: int = 5) -> pd.DataFrame:
    """A few rows of an ingested split decoded back to raw values: the pyfunc's input example."""
    import pyarrow.parquet as pq

    from emm.data.encoding import Encoder
    from emm.data.schema import Schema

    schema = Schema.load(data_dir)
    encoder = Encoder.load(data_dir, schema)
    frame = pq.read_table(Path(data_dir) / f"{split}.parquet").slice(0, rows).to_pandas()
    if frame.empty:
        raise EMMError(f"{data_dir}/{split}.parquet has no rows for an input example")
    return encoder.decode(frame)


# ---- registry: challenger / champion ------------------------------------------------------------------------
CHALLENGER, CHAMPION = "challenger", "champion"
SCORE_TAG = "mean_test_auc"


def registered_name(dataset: str) -> str:
    return f"emm-{dataset}"


def tag_version(name: str, version: str, tags: dict[str, Any]) -> None:
    """Tag a just-registered version and alias it challenger, or delete it: a version without its score
    tag would sit in the registry half-registered (promote could never rank it)."""
    client = mlflow.MlflowClient()
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        client.set_registered_model_alias(name, CHALLENGER, version)
    except Exception:
        log.error("tagging %s version %s failed; deleting the half-registered version", name, version)
        client.delete_model_version(name, version)
        raise


def _version_by_alias(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _score(version) -> float:
    try:
        return float(version.tags[SCORE_TAG])
    except (KeyError, ValueError) as exc:
        raise EMMError(f"model version {version.version} of {version.name!r} has no {SCORE_TAG!r} tag; "
                       f"it was not registered by `emm fuse`") from exc


def promote(dataset: str, store: Path, version: str | None = None) -> tuple[bool, str]:
    """Move ``champion`` to ``version`` (default: the challenger) only if its mean test AUC beats the
    current champion's. Returns (promoted, reason); changes nothing when not promoted."""
    configure(store)
    client = mlflow.MlflowClient()
    name = registered_name(dataset)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        raise EMMError(f"no registered model {name!r} in {tracking_uri(store)}: run `emm fuse {dataset}` first") from exc
    candidate = client.get_model_version(name, str(version)) if version else _version_by_alias(client, name, CHALLENGER)
    if candidate is None:
        raise EMMError(f"{name!r} has no {CHALLENGER!r} alias: name a version with --version")
    champion = _version_by_alias(client, name, CHAMPION)
    new = _score(candidate)
    if champion is not None and str(champion.version) == str(candidate.version):
        return False, f"version {candidate.version} is already the champion"
    if champion is not None and new <= _score(champion):
        return False, (f"not promoted: version {candidate.version} mean test AUC {new:.5f} does not beat champion "
                       f"version {champion.version} ({_score(champion):.5f})")
    client.set_registered_model_alias(name, CHAMPION, str(candidate.version))
    before = f"version {champion.version} ({_score(champion):.5f})" if champion else "no champion"
    return True, f"promoted version {candidate.version} (mean test AUC {new:.5f}) to champion over {before}"


def load_scorer(model_uri: str, store: Path):
    """An MLflow pyfunc by URI (models:/emm-<dataset>@champion, runs:/..., a path)."""
    configure(store)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise EMMError(f"cannot load model {model_uri!r} from {tracking_uri(store)}: {exc}") from exc
