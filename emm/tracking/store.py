"""The MLflow store: ``sqlite:///<tracking.store>/mlflow.db`` (runs, registry, aliases) with artifacts under
``<tracking.store>/artifacts``; ``MLFLOW_TRACKING_URI`` wins when set. One experiment per dataset."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from emm.errors import EMMError

# mlflow is imported by the functions that use it: ``tracking_uri`` is all ``emm predict`` needs to find a model in
# the project's own store (``emm.tracking.loading``), and importing MLflow takes longer than scoring a few rows.

_EXPERIMENT_LOCK = threading.Lock()


def registered_name(dataset: str) -> str:
    """``emm-<dataset>``: the experiment *and* the registered model of a dataset (one name, one place)."""
    return f"emm-{dataset}"


def tracking_uri(store: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(store).resolve() / 'mlflow.db'}"


def configure(store: Path) -> str:
    """Point MLflow at the project's store (created on first use)."""
    import mlflow

    uri = tracking_uri(store)
    if uri.startswith("sqlite:///"):
        Path(store).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return uri


def use_experiment(dataset: str, store: Path) -> str:
    """Create (once) and select the experiment ``emm-<dataset>``; artifacts go under the store.

    Locked: concurrent pool trainings (threads) must not both try to create the experiment."""
    import mlflow

    with _EXPERIMENT_LOCK:
        configure(store)
        name = registered_name(dataset)
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            location = (Path(store).resolve() / "artifacts").as_uri()
            exp_id = mlflow.create_experiment(name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
        return exp_id


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
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED",
                                  "RESOURCE_EXHAUSTED"}
    return False
