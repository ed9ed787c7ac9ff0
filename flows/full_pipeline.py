"""The ``emm`` Prefect flow: the pipeline's stages as tasks, each a call into ``emm.stages``.

Run it locally (Prefect starts a temporary local server by itself):
    python -m flows.full_pipeline --dataset census-income
Stages that do not exist yet in this version are simply not in the flow.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emm.runtime import set_quiet_env

set_quiet_env()

from prefect import flow, get_run_logger, task  # noqa: E402  (env must be set before prefect imports)

from emm import stages  # noqa: E402


@task(name="fetch-data", retries=1, retry_delay_seconds=5)
def fetch_task(dataset: str, params: str, mirror: str | None) -> list[str]:
    return stages.fetch_stage(dataset, params, mirror=Path(mirror) if mirror else None)


@task(name="ingest")
def ingest_task(dataset: str, params: str) -> dict:
    schema = stages.ingest_stage(dataset, params)
    return {"rows": schema.rows, "tasks": schema.task_names}


@flow(name="emm", log_prints=True)
def full_pipeline(dataset: str = "census-income", params: str = "params.yaml", mirror: str | None = None) -> dict:
    """ingest -> (pretrain -> decompose -> fuse -> evaluate -> register, as they land)."""
    logger = get_run_logger()
    if mirror is not None or not (Path("data") / dataset).exists():
        for line in fetch_task(dataset, params, mirror):
            logger.info(line)
    summary = ingest_task(dataset, params)
    logger.info("ingested %s: %s", dataset, summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--mirror", default=None, help="local folder with <dataset>/ raw files")
    args = parser.parse_args()
    full_pipeline(dataset=args.dataset, params=args.params, mirror=args.mirror)


if __name__ == "__main__":
    main()
