"""``MlflowTracker``: the Tracker a tracked stage is handed, one MLflow run each.

Why metrics and params go through ``MlflowClient`` with the run's id rather than the fluent API: the
fluent API logs to "the active run" of the calling thread, so a parent tracker used while a child run
is open, or runs opened in Prefect's worker threads, would log into the wrong run. Only model logging,
which MLflow ties to the active run, uses the fluent API, and always inside the tracker's own run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from emm.io import pid_alive
from emm.tracking.store import configure, registered_name, use_experiment

log = logging.getLogger(__name__)
PID_TAG, HOST_TAG = "emm.pid", "emm.host"


def _flat(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in params.items()}


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


class MlflowTracker:
    """One MLflow run: params, per-step metrics, files, and the scorable model (``emm.tracking.pyfunc``)."""

    def __init__(self, run_id: str, *, dataset: str, store: Path, log_models: bool = True) -> None:
        self._run_id = run_id
        self.dataset, self.store, self.log_models = dataset, Path(store), log_models
        self._client = mlflow.MlflowClient()

    @property
    def run_id(self) -> str:
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in _flat(params).items():
            self._client.log_param(self._run_id, key, value)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in _finite(metrics).items():
            self._client.log_metric(self._run_id, key, value, step=step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tag the run (strings shown in the runs table: e.g. evaluate's verdict over the donor stack)."""
        for key, value in tags.items():
            self._client.set_tag(self._run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self._run_id, str(path), artifact_path=artifact_path)

    def log_model(self, name: str, *, builder: str, config: dict[str, Any], outputs: list[str], weights: Path,
                  data_dir: Path, registered_name: str | None = None) -> str | None:
        """Log the pyfunc scorer into this run (skipped when ``tracking.log_models`` is off and nothing is to
        be registered); returns the new registered version, if any."""
        if not (self.log_models or registered_name):
            return None
        from emm.tracking.pyfunc import log_scorer, raw_example  # local: pyfunc pulls in torch and the data stack

        active = mlflow.active_run()
        ctx = contextlib.nullcontext() if active and active.info.run_id == self._run_id \
            else mlflow.start_run(run_id=self._run_id)
        with ctx:
            info = log_scorer(name, builder=builder, config=config, outputs=outputs, weights=weights,
                              data_dir=data_dir, input_example=raw_example(data_dir), registered_name=registered_name)
        version = getattr(info, "registered_model_version", None)
        return str(version) if version is not None else None

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[MlflowTracker]:
        with open_run(self.dataset, self.store, name, parent_run_id=self._run_id, tags=tags,
                      log_models=self.log_models) as child:
            yield child


@contextlib.contextmanager
def open_run(dataset: str, store: Path, name: str, *, parent_run_id: str | None = None,
             tags: Mapping[str, str] | None = None, log_models: bool = True) -> Iterator[MlflowTracker]:
    """A run in ``emm-<dataset>``, nested under ``parent_run_id`` when given; FINISHED when the block
    ends, FAILED when it raises."""
    exp_id = use_experiment(dataset, store)
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    client = mlflow.MlflowClient()
    run = _create_run(client, exp_id, name, tags)
    try:
        yield MlflowTracker(run.info.run_id, dataset=dataset, store=store, log_models=log_models)
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


@contextlib.contextmanager
def reopen_run(dataset: str, store: Path, run_id: str | None, name: str) -> Iterator[MlflowTracker]:
    """Continue an earlier run (e.g. the fuse run, to add evaluation and the model), or start one."""
    use_experiment(dataset, store)
    if run_id and run_exists(run_id):
        yield MlflowTracker(run_id, dataset=dataset, store=store)
        return
    with open_run(dataset, store, name) as tracker:
        yield tracker


def run_exists(run_id: str) -> bool:
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


# ---- runs addressed by id across tasks: the parent of pool members trained in other threads ----------------
def start_detached_run(dataset: str, store: Path, name: str, *, tags: dict[str, str] | None = None,
                       params: dict[str, Any] | None = None) -> str:
    """Create a RUNNING run in ``emm-<dataset>`` and return its id; end it with ``end_detached_run``.

    Why: the pool members train as separate Prefect tasks and nest under it by id (``parent_run_id``).
    """
    exp_id = use_experiment(dataset, store)
    client = mlflow.MlflowClient()
    created = _create_run(client, exp_id, name, dict(tags or {}))
    for key, value in _flat(params or {}).items():
        client.log_param(created.info.run_id, key, value)
    return created.info.run_id


def end_detached_run(run_id: str, store: Path, *, metrics: dict[str, float] | None = None,
                     status: str = "FINISHED") -> None:
    """Log final metrics to a run made by ``start_detached_run`` and end it (FINISHED or FAILED)."""
    configure(store)
    client = mlflow.MlflowClient()
    for key, value in _finite(metrics or {}).items():
        client.log_metric(run_id, key, value)
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


# ---- runs whose process died: RUNNING forever unless someone ends them ------------------------------------------
def _create_run(client: mlflow.MlflowClient, exp_id: str, name: str, tags: dict[str, str]):
    """Create a run tagged with this process (host, pid), first ending runs left by dead processes."""
    end_orphaned_runs(exp_id)
    return client.create_run(exp_id, run_name=name, tags={**tags, PID_TAG: str(os.getpid()),
                                                           HOST_TAG: socket.gethostname()})


def end_orphaned_runs(exp_id: str) -> list[str]:
    """Mark KILLED every RUNNING run of the experiment that was started on this host by a process that no
    longer exists (a ``kill -9``, a crashed worker); returns their ids.

    Why only this host and only dead pids: runs of live processes (concurrent pool members, another
    machine's DDP rank 0) must never be touched; a dead pid on this host is certain to be an orphan.
    """
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    ended = []
    for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) == host and pid.isdigit() and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    if ended:
        log.warning("marked %d MLflow run(s) KILLED: their process (on this host) is gone: %s", len(ended), ended)
    return ended
