"""The one logging protocol the library sees: ``Tracker``, with ``NullTracker`` for "not tracking".

Why a protocol instead of MLflow calls: the Trainer and the stages log the same things whether a run is
tracked (MLflow), untracked (tests, ``--no-track``), or on a DDP rank other than 0 (which must log nothing).
Handing them a tracker keeps their code straight-line: no ``if tracking is not None`` at every call site.
The MLflow implementation lives in ``emm.tracking`` (the only module that imports mlflow).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """Where a run's parameters, per-epoch metrics, files and model go."""

    @property
    def run_id(self) -> str | None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_model(self, name: str, *, builder: str, config: dict[str, Any], outputs: list[str], weights: Path,
                  data_dir: Path, registered_name: str | None = None) -> str | None:
        """Log a scorable model; returns the registered version when ``registered_name`` is given."""
        ...

    def child(self, name: str, tags: Mapping[str, str] | None = None) -> contextlib.AbstractContextManager[Tracker]:
        """A nested run (a pool member under the pool run); the context ends it."""
        ...


class NullTracker:
    """Logs nothing: untracked runs, tests, and every DDP rank but 0."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        return None

    def log_model(self, name: str, **_: Any) -> str | None:
        return None

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[NullTracker]:
        yield self
