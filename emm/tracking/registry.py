"""The model registry: versions of ``emm-<dataset>``, their score tags, and the aliases.

``challenger`` is the version the last evaluation registered; ``champion`` is what ``@champion`` URIs
serve; ``fast`` is the compact model of a fused one (``emm compress``: a version tagged ``compact``), for
callers who trade the last 0.0002 of AUC for speed. The promotion *policy* (when champion may move) is the pipeline's (``emm.pipeline.register``);
this module only reads and writes the registry, and turns MLflow's errors into messages that say what to do.
``registration_lock`` makes the registrations of one model take turns, across processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
from filelock import FileLock, Timeout

from emm.errors import EMMError
from emm.tracking.store import configure, tracking_uri

log = logging.getLogger(__name__)
CHALLENGER, CHAMPION, FAST = "challenger", "champion", "fast"
LOCK_WAIT_S = 1800.0  # how long a registration waits for another one of the same model before giving up
SCORE_TAG = "mean_test_auc"
# sha256 of the fused weights a version was registered from: evaluating the same fused model again reuses
# that version instead of registering a duplicate (a new version number for the very same model).
DIGEST_TAG = "fused_sha256"
# A compact version (``emm compress``) is tagged ``compact=true`` and, like DIGEST_TAG for fused weights, with
# the sha256 of its own weights, so compressing again into the same weights reuses its version.
COMPACT_TAG, COMPACT_DIGEST_TAG = "compact", "compact_sha256"


def lock_path(name: str, store: Path) -> Path:
    """The lock file of ``name``'s registrations, beside the store: in the folder of the SQLite database (the
    default ``<store>/mlflow.db``, or the one ``MLFLOW_TRACKING_URI`` names) or in a file store's folder. For a
    tracking server there is no folder to share: the lock is in this machine's temp folder (one per URI),
    so it serialises the registrations made from this machine only."""
    uri = tracking_uri(store)
    parsed = urlparse(uri)
    lock_name = f".emm-registry-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"
    if uri.startswith("sqlite:///"):
        return Path(unquote(uri.removeprefix("sqlite:///").split("?")[0])).parent / lock_name
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)) / lock_name
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (a Windows drive letter parses as a scheme)
        return Path(uri) / lock_name
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"emm-registry-{key}{lock_name}"


@contextlib.contextmanager
def registration_lock(name: str, store: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[Path]:
    """Hold the registration lock of ``name`` (a file lock, released by the OS if the process dies).

    Why: registering checks whether the fused weights are registered already, then registers them; two
    ``emm evaluate`` of one fused model at once would both find nothing and register two versions. Held
    from the check until the new version is tagged, one evaluation registers and the other reuses it."""
    path = lock_path(name, store)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for %s: another process is registering %s", path, name)
        try:
            lock.acquire(timeout=wait_s)
        except Timeout as exc:
            raise EMMError(f"waited {wait_s:.0f} s for {path}: another process (an `emm evaluate`) is still "
                           f"registering {name!r}; let it finish or stop it, then run again") from exc
    try:
        yield path
    finally:
        lock.release()


def tag_version(name: str, version: str, tags: dict[str, Any], alias: str = CHALLENGER) -> None:
    """Tag a just-registered version and give it ``alias`` (challenger, or fast for a compact model), or
    delete it: a version without its score tag would sit in the registry half-registered (promote could
    never rank it)."""
    client = mlflow.MlflowClient()
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value))
        client.set_registered_model_alias(name, alias, version)
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


def is_compact(version) -> bool:
    """Whether a version is a compact model (``emm compress``), not a fused one."""
    return (getattr(version, "tags", None) or {}).get(COMPACT_TAG) == "true"


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
