"""Where each stage writes, and the tracker a stage logs through: the only place that knows the folders.

``artifacts/<dataset>/<stage>/``: each stage owns exactly one folder (plus a ``*-work`` folder of
checkpoints for the training stages). A stage is tracked only when asked and only on the main DDP rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from emm.pipeline.params import Params, TrackingConfig
from emm.tracker import NullTracker, Tracker
from emm.train import distributed as ddp


def stage_dir(cfg: Params, dataset: str, stage: str) -> Path:
    """artifacts/<dataset>/<stage>/ : each stage owns exactly one folder."""
    return cfg.paths.artifacts / dataset / stage


@contextlib.contextmanager
def stage_tracker(tracking: TrackingConfig, dataset: str, name: str, *, enabled: bool = True,
                  parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
    """An MLflow run for the stage, or a ``NullTracker`` when tracking is off or this is not DDP rank 0."""
    if not enabled or not ddp.current().is_main:
        yield NullTracker()
        return
    from emm.tracking.runs import open_run  # local: untracked runs never pay for importing mlflow

    with open_run(dataset, tracking.store, name, parent_run_id=parent_run_id, tags=tags,
                  log_models=tracking.log_models) as tracker:
        yield tracker
