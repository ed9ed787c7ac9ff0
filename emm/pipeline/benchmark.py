"""Stage ``benchmark``: the paper's experiments (Table I, Table II, Figure 3) on one dataset.

The work is in ``emm.pipeline.experiments`` (data per task set, jobs, scheduler, report); this is the
entry point the CLI and the Prefect flow call.
"""

from __future__ import annotations

from pathlib import Path

from emm.pipeline.experiments.runner import BenchmarkRun, run_benchmark


def benchmark_stage(dataset: str, params: Path | str | None = None, *, profile: str | None = None,
                    workers: int | None = None, track: bool = True) -> BenchmarkRun:
    return run_benchmark(dataset, params, profile=profile, workers=workers, track=track)
