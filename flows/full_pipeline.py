"""The ``emm`` Prefect flow: the pipeline's stages as tasks, each one call into ``emm.stages``.

    python -m flows.full_pipeline --dataset census-income [--mirror ../shared/data] [--promote]

Run as a script, Prefect starts a temporary local server by itself; with PREFECT_API_URL set, the run
is reported to that server. The flow holds no logic of its own: DVC and the CLI call the same functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emm.runtime import set_quiet_env

set_quiet_env()

from prefect import flow, get_run_logger, task  # noqa: E402  (env must be set before prefect imports)
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from emm import stages  # noqa: E402


@task(name="fetch-data", retries=1, retry_delay_seconds=5)
def fetch_task(dataset: str, params: str, mirror: str | None) -> list[str]:
    return stages.fetch_stage(dataset, params, mirror=Path(mirror) if mirror else None)


@task(name="ingest")
def ingest_task(dataset: str, params: str) -> dict:
    schema = stages.ingest_stage(dataset, params)
    return {"rows": schema.rows, "tasks": schema.task_names}


@task(name="pretrain")
def pretrain_task(dataset: str, params: str) -> list[dict]:
    entries = stages.pretrain_stage(dataset, params, resume=True, progress=False)
    return [{"name": e.name, "task": e.task, "test_auc": e.test_auc} for e in entries]


@task(name="decompose")
def decompose_task(dataset: str, params: str) -> str:
    plan, _ = stages.decompose_stage(dataset, params)
    return plan.report()


@task(name="fuse")
def fuse_task(dataset: str, params: str) -> dict:
    result = stages.fuse_stage(dataset, params, progress=False)
    return {t: m["auc"] for t, m in result.test.items()}


@task(name="evaluate-register")
def evaluate_task(dataset: str, params: str) -> dict:
    return stages.evaluate_stage(dataset, params)


@task(name="promote")
def promote_task(dataset: str, params: str) -> str:
    return stages.promote_stage(dataset, params)[1]


def auc_markdown(dataset: str, summary: dict) -> str:
    lines = [f"# EMM on {dataset}", "", "| task | EMM test AUC | pool mean | pool best | Gain |", "|---|---|---|---|---|"]
    for task_name, r in summary["tasks"].items():
        lines.append(f"| {task_name} | {r['auc']:.5f} | {r['pool_mean_auc']:.5f} | {r['pool_best_auc']:.5f} | "
                     f"{r['gain']:+.5f} |")
    if summary.get("registered_version"):
        lines += ["", f"Registered `emm-{dataset}` version {summary['registered_version']} (alias `challenger`)."]
    return "\n".join(lines)


@flow(name="emm", log_prints=True)
def full_pipeline(dataset: str = "census-income", params: str = "params.yaml", mirror: str | None = None,
                  promote: bool = True) -> dict:
    """fetch -> ingest -> pretrain -> decompose -> fuse -> evaluate/register -> promote."""
    logger = get_run_logger()
    if mirror is not None or not (Path("data") / dataset).exists():
        for line in fetch_task(dataset, params, mirror):
            logger.info(line)
    logger.info("ingested: %s", ingest_task(dataset, params))
    for entry in pretrain_task(dataset, params):
        logger.info("pool model %s (%s): test AUC %.5f", entry["name"], entry["task"], entry["test_auc"])
    logger.info("\n%s", decompose_task(dataset, params))
    logger.info("fused test AUC: %s", fuse_task(dataset, params))
    summary = evaluate_task(dataset, params)
    create_markdown_artifact(key=f"emm-{dataset}-auc".replace("_", "-"), markdown=auc_markdown(dataset, summary))
    if promote:
        logger.info(promote_task(dataset, params))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--mirror", default=None, help="local folder with <dataset>/ raw files")
    parser.add_argument("--no-promote", action="store_true", help="register as challenger only")
    args = parser.parse_args()
    full_pipeline(dataset=args.dataset, params=args.params, mirror=args.mirror, promote=not args.no_promote)


if __name__ == "__main__":
    main()
