"""The entry points of ``emm benchmark`` and ``emm relatedness`` (and the ``emm-benchmark`` Prefect flow): the
paper's experiments (Table I, Table II, Figure 3) on one dataset, and the relatedness sweep on synthetic
tables (where fusion pays).

The work is in this package (data per task set, jobs, scheduler, report); the CLI and the flow call only
these two functions, so neither depends on how the experiments are laid out.
"""

from __future__ import annotations

from pathlib import Path

from harness.experiments.relatedness import RelatednessRun, run_relatedness
from harness.experiments.runner import BenchmarkRun, run_benchmark


def benchmark_stage(dataset: str, params: Path | str | None = None, *, config: Path | str | None = None,
                    profile: str | None = None, workers: int | None = None, track: bool = True) -> BenchmarkRun:
    return run_benchmark(dataset, params, config=config, profile=profile, workers=workers, track=track)


def relatedness_stage(params: Path | str | None = None, *, config: Path | str | None = None,
                      shared_weights: list[float] | None = None, rows: int | None = None,
                      seeds: list[int] | None = None, max_epochs: int | None = None, workers: int | None = None,
                      track: bool = True) -> RelatednessRun:
    return run_relatedness(params, config=config, shared_weights=shared_weights, rows=rows, seeds=seeds,
                           max_epochs=max_epochs, workers=workers, track=track)
