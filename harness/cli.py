"""``emm benchmark`` and ``emm relatedness``: the harness's two commands, mounted on the ``emm`` CLI.

Why a ``register`` function behind an entry point (pyproject ``[project.entry-points."emm.commands"]``):
emm never imports the harness (the import contract), yet the commands stay where users know them. emm
calls ``register(app)`` as its CLI is built; this module imports only typer at the top, and each command
imports the experiments (torch, the trainer) only when it runs, so ``emm --help`` stays fast.
"""

# No ``from __future__ import annotations``: typer reads the annotations of the commands defined inside
# ``register``, and their names (ParamsOpt, ...) are local to it, so they must be evaluated where they stand.
from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="the harness's settings: profiles, seeds, results folder (default: harness/benchmark.yaml; "
    "with --profile scarce: harness/scarce.yaml)")]
SCARCE = "scarce"  # `emm benchmark DATASET --profile scarce`: the scarce-label grid, not a benchmark.yaml profile


def numbers(text: Optional[str], kind: type, option: str) -> Optional[list]:
    """``"0,0.3"`` -> ``[0.0, 0.3]``; a user error (EMMError) names the option otherwise."""
    from emm.errors import EMMError

    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise EMMError(f"{option} takes comma-separated numbers, e.g. 0,0.3,0.6,0.9; got {text!r}") from exc


def register(app: typer.Typer) -> None:
    """Add ``benchmark`` and ``relatedness`` to emm's app, with emm's own error handling, console and options."""
    from emm.cli import ParamsOpt, console, user_errors  # emm.cli is built by the time it calls this

    @app.command("benchmark")
    @user_errors
    def benchmark_cmd(
        dataset: Annotated[str, typer.Argument(help="census-income, aliexpress, ali-ccp, or a declared dataset")],
        profile: Annotated[Optional[str], typer.Option(
            help="benchmark.profiles entry of the harness config (default: benchmark.profile)")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="same as --profile quick: a CI-sized run")] = False,
        workers: Annotated[Optional[int], typer.Option(
            help="parallel training processes (default benchmark.workers)")] = None,
        no_track: Annotated[bool, typer.Option("--no-track", help="do not log to MLflow")] = False,
        params: ParamsOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        """Pool, every baseline, the ablations and EMM over seeds (+ LightGBM, + 3/4-task runs): tables and plots
        in results/<dataset>/. Finished runs are reused, so an interrupted benchmark resumes. `--profile scarce`:
        the scarce-label benchmark (harness/scarce.yaml; with --quick its CI-sized variant), results/<dataset>/scarce/."""
        if profile == SCARCE:
            from emm.errors import EMMError
            from harness.experiments.scarce_run import run_scarce

            scarce = run_scarce(dataset, params, config=config, variant="quick" if quick else "full", workers=workers,
                                track=not no_track)
            if scarce.files:
                console.print(scarce.files[0].read_text(), highlight=False, soft_wrap=True)
            console.print(f"{len(scarce.records)} of {len(scarce.cells)} cells ({scarce.trained} measured now) in "
                          f"{scarce.seconds / 60:.1f} min; wrote:")
            for f in scarce.files:
                console.print(f"  {f}")
            if scarce.failed:
                raise EMMError(f"{len(scarce.failed)} scarce cell(s) failed (the others are kept; run again to retry): "
                               + "; ".join(f"{k}: {why}" for k, why in scarce.failed.items()))
            return
        from harness.experiments.stages import benchmark_stage

        run = benchmark_stage(dataset, params, config=config, profile="quick" if quick else profile, workers=workers,
                              track=not no_track)
        console.print((run.out_dir / "table1.md").read_text(), highlight=False, soft_wrap=True)
        console.print(f"{len(run.results)} runs in {run.seconds / 60:.1f} min; wrote:")
        for f in run.files:
            console.print(f"  {f}")

    @app.command("relatedness")
    @user_errors
    def relatedness_cmd(
        shared_weights: Annotated[Optional[str], typer.Option(
            help="comma-separated relatedness levels (default benchmark.relatedness.shared_weights)")] = None,
        rows: Annotated[Optional[int], typer.Option(help="rows per synthetic table (default synth.rows)")] = None,
        seeds: Annotated[Optional[str], typer.Option(
            help="comma-separated seeds (default benchmark.relatedness.seeds)")] = None,
        max_epochs: Annotated[Optional[int], typer.Option(help="cap on every model's epochs")] = None,
        workers: Annotated[Optional[int], typer.Option(
            help="parallel training processes (default benchmark.workers)")] = None,
        no_track: Annotated[bool, typer.Option("--no-track", help="do not log to MLflow")] = False,
        params: ParamsOpt = None,
        config: ConfigOpt = None,
    ) -> None:
        """Where fusion pays: sweep planted task relatedness on `emm synth` tables, fuse at each level, compare
        with the donors (paired CIs) under the oracle ceiling: results/<synth.dataset>/relatedness.*"""
        from harness.experiments.stages import relatedness_stage

        run = relatedness_stage(params, config=config, rows=rows, max_epochs=max_epochs, workers=workers,
                                shared_weights=numbers(shared_weights, float, "--shared-weights"),
                                seeds=numbers(seeds, int, "--seeds"), track=not no_track)
        console.print((run.out_dir / "relatedness.md").read_text(), highlight=False, soft_wrap=True)
        console.print(f"{run.jobs} jobs in {run.seconds / 60:.1f} min; wrote:")
        for f in run.files:
            console.print(f"  {f}")
