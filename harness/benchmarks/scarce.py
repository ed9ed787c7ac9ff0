"""When does fusion pay? The scarce-label benchmark (issue 24): one task keeps its label on a fraction of the
train/val rows, the other task on all of them, and EMM is paired with every rival on the scarce task's test rows.

On ``emm synth`` tables (conversion scarce at each planted relatedness ``synth.shared_weight``, plus a table
with rare conversions and every row labelled) and on Census (income scarce with marital full, and the
reverse). Rows, CIs and timings: ``harness.experiments.scarce_report``; the grid: ``harness/scarce.yaml``.

    python -m harness.benchmarks.scarce aliexpress-synth [--variant full|quick] [--params params.yaml]
        [--config harness/scarce.yaml] [--workers 2] [--only w0.90-conversion] [--dry-run] [--no-track]
    emm benchmark aliexpress-synth --profile scarce [--quick]      (the same, through the emm CLI)

Writes results/<dataset>/scarce/{scarce.md, scarce.json, scarce.png} (quick: scarce-quick/); finished cells
(results/<dataset>/scarce/cells/) and jobs (results/<dataset>/raw/scarce/) are reused, so a stopped run resumes.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from emm.errors import EMMError


def describe_plan(dataset: str, params: Path | str | None, config: Path | str | None, variant: str) -> str:
    """The cells and data variants a run would make, without training anything (``--dry-run``)."""
    from harness.experiments.scarce_plan import load_scarce_config, plan_cells, variants
    from harness.params import load_harness_params

    cfg = load_harness_params(params)
    prof = load_scarce_config(config).pick(variant)
    cells = plan_cells(dataset, cfg.synth.dataset, prof)
    vs = variants(cells)
    lines = [f"scarce benchmark {dataset} ({variant}): {len(cells)} cells on {len(vs)} data variants, "
             f"{sum(len(v.seeds) for v in vs)} pools to train (variant x seed), epoch cap {prof.max_epochs}"]
    for v in vs:
        lines.append(f"  {v.key}: seeds {v.seeds}; cells " + ", ".join(
            f"{c.group}{' ★' if c.headline else ''} (seed {c.seed})" for c in v.cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="params.yaml synth.dataset (aliexpress-synth) or census-income")
    ap.add_argument("--variant", default="full", help="scarce.variants entry (full, quick)")
    ap.add_argument("--params", default=None, help="emm's params file (default ./params.yaml)")
    ap.add_argument("--config", default=None, help="the scarce config (default harness/scarce.yaml)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated substrings of cell keys: run just those")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, train nothing")
    ap.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.dry_run:
            print(describe_plan(args.dataset, args.params, args.config, args.variant))
            return 0
        from harness.experiments.scarce_run import run_scarce

        run = run_scarce(args.dataset, args.params, config=args.config, variant=args.variant, workers=args.workers,
                         only=args.only.split(",") if args.only else None, track=not args.no_track)
    except EMMError as exc:
        print(f"error: {exc}")
        return 1
    if run.files:
        print(run.files[0].read_text())
    print(f"{len(run.records)} of {len(run.cells)} cells ({run.trained} measured now) in {run.seconds / 60:.1f} min; "
          f"wrote:\n" + "\n".join(f"  {f}" for f in run.files))
    for key, why in run.failed.items():
        print(f"failed: {key}: {why}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
