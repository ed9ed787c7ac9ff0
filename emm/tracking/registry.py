"""The model registry: versions of ``emm-<dataset>``, their score tags, and the two aliases.

``challenger`` is the version the last evaluation registered; ``champion`` is what ``@champion`` URIs
serve. The promotion *policy* (when champion may move) is the pipeline's (``emm.pipeline.register``);
this module only reads and writes the registry, and turns MLflow's errors into messages that say what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow

from emm.errors import EMMError
from emm.tracking.store import configure, tracking_uri

log = logging.getLogger(__name__)
CHALLENGER, CHAMPION = "challenger", "champion"
SCORE_TAG = "mean_test_auc"
# sha256 of the fused weights a version was registered from: evaluating the same fused model again reuses
# that version instead of registering a duplicate (a new version number for the very same model).
DIGEST_TAG = "fused_sha256"


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


def require_model(name: str, store: Path, fix: str) -> None:
    """Fail with ``fix`` when ``name`` is not a registered model of the store."""
    configure(store)
    try:
        mlflow.MlflowClient().get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        raise EMMError(f"no registered model {name!r} in {tracking_uri(store)}: {fix}") from exc


def get_version(name: str, version: str):
    """A version by number; a clear error for one that is not a number or does not exist."""
    if not str(version).isdigit():
        raise EMMError(f"--version {version!r} is not a version number of {name!r} (use e.g. --version 3)")
    try:
        return mlflow.MlflowClient().get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        known = sorted(int(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name = '{name}'"))
        raise EMMError(f"{name!r} has no version {version}; its versions are {known}") from exc


def version_with_tag(name: str, key: str, value: str):
    """The newest version of ``name`` tagged ``key=value``, or None (also when ``name`` is not registered)."""
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    matching = [v for v in versions if v.tags.get(key) == value]
    return max(matching, key=lambda v: int(v.version)) if matching else None


def version_by_alias(name: str, alias: str):
    """The version ``alias`` points at, or None."""
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))


def version_score(version) -> float:
    """The mean test AUC a version was registered with."""
    try:
        return float(version.tags[SCORE_TAG])
    except (KeyError, ValueError) as exc:
        raise EMMError(f"model version {version.version} of {version.name!r} has no {SCORE_TAG!r} tag; "
                       f"it was not registered by `emm evaluate`") from exc


def model_version_exists(name: str, store: Path, version: str | None) -> bool:
    """Whether ``name`` still has ``version`` in the registry (a cached registration is void if not)."""
    if not version:
        return False
    configure(store)
    try:
        mlflow.MlflowClient().get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        return False
    return True
