"""The ``emm-benchmark`` Prefect flow: ``emm benchmark`` as one task, so the paper's experiments can be
scheduled and watched like the pipeline.

    python -m flows.benchmark --dataset census-income [--profile quick] [--config harness/benchmark.yaml]

The benchmark parallelises its own training runs (worker processes, one torch thread each) and resumes
from its finished runs, so one Prefect task is the right grain: a retry continues where it stopped.
"""

from __future__ import annotations

import argparse

from emm.runtime import set_quiet_env

set_quiet_env()

from prefect import flow, get_run_logger, task  # noqa: E402  (env must be set before prefect imports)
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from emm.tracking.store import registered_name  # noqa: E402
from harness.experiments.stages import benchmark_stage  # noqa: E402


@task(name="benchmark", retries=1, retry_delay_seconds=10)
def benchmark_task(dataset: str, params: str, profile: str | None, workers: int | None,
                   config: str | None = None) -> dict:
    run = benchmark_stage(dataset, params, config=config, profile=profile, workers=workers)
    return {"out_dir": str(run.out_dir), "table1": (run.out_dir / "table1.md").read_text(),
            "minutes": round(run.seconds / 60, 1), "runs": len(run.results)}


@flow(name="emm-benchmark", log_prints=True)
def benchmark(dataset: str = "census-income", params: str = "params.yaml", profile: str | None = None,
              workers: int | None = None, config: str | None = None) -> dict:
    """Table I, Table II and Figure 3 for one dataset (see harness/experiments); ``config``: the harness's
    settings (default harness/benchmark.yaml)."""
    summary = benchmark_task(dataset, params, profile, workers, config)
    get_run_logger().info("%d runs in %.1f min -> %s", summary["runs"], summary["minutes"], summary["out_dir"])
    create_markdown_artifact(key=f"{registered_name(dataset)}-benchmark", markdown=summary["table1"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--config", default=None, help="the harness's settings (default harness/benchmark.yaml)")
    args = parser.parse_args()
    benchmark(dataset=args.dataset, params=args.params, profile=args.profile, workers=args.workers,
              config=args.config)


if __name__ == "__main__":
    main()
