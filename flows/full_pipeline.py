"""The ``emm`` Prefect flow: the pipeline's stages as tasks, each one call into ``emm.pipeline``.

    python -m flows.full_pipeline --dataset census-income [--params params.yaml] [--mirror ../shared/data]

Run as a script, Prefect starts a temporary local server by itself; with PREFECT_API_URL set, the run
is reported to that server. Deployed (``prefect.yaml``: ``emm/full-pipeline`` on the process work pool
``emm-process``), a worker runs the same function. The flow holds no logic of its own: DVC and the CLI
call the same stage functions.

What Prefect adds here, and why:
- pool models train as concurrent tasks (one per model), each with its share of the cores;
- each stage's result is cached on its inputs (``emm.pipeline.cache.stage_cache_key``: raw data bytes or the
  upstream key, the params sections it reads, its code), persisted under PREFECT_HOME, so a rerun
  skips finished stages; a cached result is only reused while the stage's output folder still exists;
- transient failures (network, a locked SQLite store) are retried, an ``EMMError`` fails at once;
- fusion training runs on the ``gpu`` work pool (deployment ``emm-fuse/gpu``) when a worker is online
  there, else in this process.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Literal

from emm.runtime import set_quiet_env

set_quiet_env()
# emm's own loggers go to the Prefect run log too (stage progress: "income-mlp: test AUC ...").
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "emm")

from prefect import Task, flow, get_run_logger, task  # noqa: E402  (env must be set before prefect imports)
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.futures import wait  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from emm.pipeline.cache import stage_cache_key, stage_output_ready  # noqa: E402
from emm.pipeline.compress import compress_stage  # noqa: E402
from emm.pipeline.compress import summary_lines as compact_lines  # noqa: E402
from emm.pipeline.decompose import decompose_stage  # noqa: E402
from emm.pipeline.evaluate import evaluate_stage, summary_lines, summary_table  # noqa: E402
from emm.pipeline.export import export_stage  # noqa: E402
from emm.pipeline.fuse import fuse_stage, fuse_summary  # noqa: E402
from emm.pipeline.ingest import fetch_stage, ingest_stage, raw_dir  # noqa: E402
from emm.pipeline.pretrain import (  # noqa: E402
    assemble_pool_stage, close_pool_run, open_pool_run, pool_model_names, pretrain_model_stage)
from emm.pipeline.register import promote_stage  # noqa: E402
from emm.runtime import cpu_cores, torch_threads_for  # noqa: E402
from emm.tracking.store import is_transient, registered_name  # noqa: E402

logging.getLogger("emm").setLevel(logging.INFO)  # Prefect attaches its handlers to "emm" but leaves the level
from flows.gpu import FUSE_DEPLOYMENT, fuse_on_gpu_pool, gpu_pool_online  # noqa: E402

# Concurrent pool trainings: one per core unless EMM_PRETRAIN_WORKERS says otherwise; each training gets
# cores // concurrent torch threads (emm.runtime.torch_threads_for).
PRETRAIN_WORKERS = max(1, int(os.environ.get("EMM_PRETRAIN_WORKERS") or cpu_cores()))


def retry_transient(task_: Task, task_run: Any, state: Any) -> bool:
    """Retry only errors that may pass (emm.tracking.store.is_transient); an EMMError fails the run at once."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(exc, BaseException) and is_transient(exc)


def cache_on(stage: str, label: str | None = None):
    """Prefect cache_key_fn for ``stage``: the stage's input hash (see ``emm.pipeline.cache.stage_cache_key``),
    prefixed by ``label`` so two tasks keyed on one stage keep separate records."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return f"emm-{label or stage}-" + stage_cache_key(parameters["dataset"], parameters["params"], stage,
                                                        parameters.get("name"))

    return key


def fresh_unless_ready(task_: Task, dataset: str, params: str, stage: str, name: str | None = None) -> Task:
    """The task, forced to recompute (and overwrite its cache record) when the stage's output is gone.

    Why: Prefect's cache knows the inputs, not the files; a hit whose output folder was deleted would
    hand the next stage a result pointing at nothing.
    """
    if stage_output_ready(dataset, params, stage, name):
        return task_
    return task_.with_options(refresh_cache=True)


CACHED = dict(persist_result=True, result_serializer="json")


@task(name="fetch-data", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def fetch_task(dataset: str, params: str, mirror: str | None) -> list[str]:
    from pathlib import Path

    return fetch_stage(dataset, params, mirror=Path(mirror) if mirror else None)


@task(name="ingest", cache_key_fn=cache_on("ingest"), **CACHED)
def ingest_task(dataset: str, params: str) -> dict:
    schema = ingest_stage(dataset, params)
    return {"rows": schema.rows, "tasks": schema.task_names}


@task(name="pool-run", cache_key_fn=cache_on("pretrain", "pool-run"), **CACHED, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_transient)
def pool_run_task(dataset: str, params: str, models: list[str]) -> str | None:
    """The MLflow parent run of this pool (cached with the pool: a reused pool keeps its old parent)."""
    return open_pool_run(dataset, params, models=models)


@task(name="pretrain-model", task_run_name="pretrain-{name}", cache_key_fn=cache_on("pretrain-model"), **CACHED,
      retries=1, retry_delay_seconds=2, retry_condition_fn=retry_transient)
def pretrain_model_task(dataset: str, params: str, name: str, parent_run_id: str | None, threads: int) -> dict:
    entry = pretrain_model_stage(dataset, params, name, parent_run_id=parent_run_id, threads=threads)
    get_run_logger().info("pool model %s (%s): test AUC %.5f, %d epochs", entry["name"], entry["task"],
                          entry["test_auc"], entry["epochs_run"])
    return entry


@task(name="assemble-pool", cache_key_fn=cache_on("pretrain", "assemble-pool"), **CACHED, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_transient)
def assemble_pool_task(dataset: str, params: str, entries: list[dict], parent_run_id: str | None) -> list[dict]:
    return assemble_pool_stage(dataset, params, entries, parent_run_id=parent_run_id)


@task(name="decompose", cache_key_fn=cache_on("decompose"), **CACHED)
def decompose_task(dataset: str, params: str) -> str:
    plan, _ = decompose_stage(dataset, params)
    return plan.report()


@task(name="fuse", cache_key_fn=cache_on("fuse"), **CACHED)
def fuse_task(dataset: str, params: str, on_gpu_pool: bool = False) -> dict:
    """Train the fused model here, or on the gpu work pool (same stage function, artifacts shared)."""
    if on_gpu_pool:
        fuse_on_gpu_pool(dataset, params)
        return fuse_summary(dataset, params)
    result = fuse_stage(dataset, params, progress=False)
    return {t: m["auc"] for t, m in result.test.items()}


@task(name="evaluate-register", cache_key_fn=cache_on("evaluate"), **CACHED, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def evaluate_task(dataset: str, params: str) -> dict:
    return evaluate_stage(dataset, params)


@task(name="export-onnx", cache_key_fn=cache_on("export"), **CACHED, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def export_task(dataset: str, params: str) -> dict:
    """The ONNX file of the registered fused model, logged to its version (as `emm export` and `dvc repro`)."""
    report = export_stage(dataset, params)
    return {"path": str(report.path), "max_abs_diff": report.max_abs_diff, "version": report.version}


@task(name="compress", cache_key_fn=cache_on("compress"), **CACHED, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_transient)
def compress_task(dataset: str, params: str) -> dict:
    """The compact model, registered @fast when within the bound (as `emm compress` and `dvc repro`)."""
    return compress_stage(dataset, params)


@task(name="promote", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def promote_task(dataset: str, params: str) -> str:
    return promote_stage(dataset, params)[1]


def auc_markdown(dataset: str, summary: dict, compact: dict | None = None) -> str:
    """evaluate's summary as `emm evaluate` prints it: what fusion added over the donor stack first; then, given
    ``compact`` (compress's compact.json), the compact model as `emm compress` prints it."""
    columns, rows = summary_table(summary)
    lines = [f"# EMM on {dataset}", "", *(f"- {line}" for line in summary_lines(summary)), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if summary.get("registered_version"):
        lines += ["", f"Registered `{registered_name(dataset)}` version {summary['registered_version']} (alias `challenger`)."]
    if compact is not None:
        lines += ["", "## The compact model (`emm compress`, alias `fast`)", "", *(f"- {line}" for line in compact_lines(compact))]
    return "\n".join(lines)


def pretrain_pool(dataset: str, params: str) -> list[dict]:
    """One concurrent task per pool model under one MLflow parent run, then ``pool/`` assembled."""
    names = pool_model_names(dataset, params)
    threads = torch_threads_for(min(len(names), PRETRAIN_WORKERS))
    parent = fresh_unless_ready(pool_run_task, dataset, params, "pretrain")(dataset, params, names)
    futures = [fresh_unless_ready(pretrain_model_task, dataset, params, "pretrain-model", n)
               .submit(dataset, params, n, parent, threads) for n in names]
    wait(futures)
    failed = [f for f in futures if not f.state.is_completed()]
    if failed:
        close_pool_run(parent, params, failed=True)
        failed[0].result()  # raises the first member's error: the flow fails with its message
    entries = [f.result() for f in futures]
    return fresh_unless_ready(assemble_pool_task, dataset, params, "pretrain")(dataset, params, entries, parent)


@flow(name="emm", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=PRETRAIN_WORKERS))
def full_pipeline(dataset: str = "census-income", params: str = "params.yaml", mirror: str | None = None,
                  promote: bool = True, fuse_on: Literal["auto", "local", "gpu"] = "auto") -> dict:
    """fetch -> ingest -> pretrain (one task per pool model) -> decompose -> fuse -> evaluate/register -> export
    (ONNX, logged to the registered version) -> compress (the compact model, @fast when within the bound) -> promote.

    ``params`` is a params profile (a params.yaml-shaped file, e.g. params/tiny.yaml); ``mirror`` a local
    folder holding ``<dataset>/`` raw files; ``fuse_on``: auto = the gpu work pool when a worker is online
    there, else here.
    """
    logger = get_run_logger()
    if mirror is not None or not raw_dir(dataset, params).exists():
        for line in fetch_task(dataset, params, mirror):
            logger.info(line)
    logger.info("ingested: %s", fresh_unless_ready(ingest_task, dataset, params, "ingest")(dataset, params))
    for entry in pretrain_pool(dataset, params):
        logger.info("pool: %s (%s) test AUC %.5f", entry["name"], entry["task"], entry["test_auc"])
    logger.info("\n%s", fresh_unless_ready(decompose_task, dataset, params, "decompose")(dataset, params))
    on_gpu = fuse_on == "gpu" or (fuse_on == "auto" and gpu_pool_online())
    if on_gpu:
        logger.info("fusion training goes to deployment %s", FUSE_DEPLOYMENT)
    logger.info("fused test AUC: %s", fresh_unless_ready(fuse_task, dataset, params, "fuse")(dataset, params, on_gpu))
    summary = fresh_unless_ready(evaluate_task, dataset, params, "evaluate")(dataset, params)
    exported = fresh_unless_ready(export_task, dataset, params, "export")(dataset, params)
    logger.info("exported %s (version %s; max |onnxruntime - torch| %.2e on logits)", exported["path"],
                exported["version"], exported["max_abs_diff"])
    compact = fresh_unless_ready(compress_task, dataset, params, "compress")(dataset, params)
    for line in compact_lines(compact):
        logger.info("compress: %s", line)
    create_markdown_artifact(key=f"{registered_name(dataset)}-auc".replace("_", "-"),
                             markdown=auc_markdown(dataset, summary, compact),
                             description=f"EMM test AUC on {dataset}")
    if promote:
        logger.info(promote_task(dataset, params))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml", help="params profile (e.g. params/tiny.yaml)")
    parser.add_argument("--mirror", default=None, help="local folder with <dataset>/ raw files")
    parser.add_argument("--no-promote", action="store_true", help="register as challenger only")
    parser.add_argument("--fuse-on", choices=["auto", "local", "gpu"], default="auto")
    args = parser.parse_args()
    full_pipeline(dataset=args.dataset, params=args.params, mirror=args.mirror, promote=not args.no_promote,
                  fuse_on=args.fuse_on)


if __name__ == "__main__":
    main()
