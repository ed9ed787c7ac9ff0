"""Stage ``benchmark``: the paper's experiments (Table I, Table II, Figure 3) on one dataset, and the
relatedness sweep on synthetic tables (where fusion pays).

The work is in ``emm.pipeline.experiments`` (data per task set, jobs, scheduler, report); this is the
entry point the CLI and the Prefect flow call.
"""

from __future__ import annotations

from pathlib import Path

from emm.pipeline.experiments.relatedness import RelatednessRun, run_relatedness
from emm.pipeline.experiments.runner import BenchmarkRun, run_benchmark


def benchmark_stage(dataset: str, params: Path | str | None = None, *, profile: str | None = None,
                    workers: int | None = None, track: bool = True) -> BenchmarkRun:
    return run_benchmark(dataset, params, profile=profile, workers=workers, track=track)


def relatedness_stage(params: Path | str | None = None, *, shared_weights: list[float] | None = None,
                      rows: int | None = None, seeds: list[int] | None = None, max_epochs: int | None = None,
                      workers: int | None = None, track: bool = True) -> RelatednessRun:
    return run_relatedness(params, shared_weights=shared_weights, rows=rows, seeds=seeds, max_epochs=max_epochs,
                           workers=workers, track=track)
