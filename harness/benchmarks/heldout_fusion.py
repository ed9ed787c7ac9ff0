"""Does the fusion pay when it is fitted on rows its donors never saw? One probe, on the benchmark's pools.

Why: the donors are scored on their own training rows when the fused model trains there, and on those
rows they look better than they are (Census: train AUC well above validation AUC), so whatever the AKF
levels and the blend learn on train rows is fitted to in-sample donor outputs. The donor stack, fitted on
validation rows, does not have that problem. This probe fuses each seed's pool (the `emm benchmark` work
folder of the default profile) with the params file's ``fuse`` settings (the fuse stage's own plan and
runner, ``emm.fusion.procedure``: its phases and target included), but fitted on half of the validation
split (a seeded random half: the stack is fitted there too) and early-stopped on the other half; test rows
are untouched. It prints, per task and against the same seed's models on the same test
rows, paired bootstrap 95% CIs (1,000 resamples of test rows, pooled over seeds) of

    held-out EMM − donor stack (fitted on all validation rows, Table I's row)
    held-out EMM − EMM fitted on train rows (Table I's EMM)
    held-out EMM − best donor (by validation AUC)

    python -m harness.benchmarks.heldout_fusion [--params params.yaml] [--config harness/benchmark.yaml]
                                                [--dataset census-income] [--seeds 2026,2027,2028] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split
from emm.fusion.decompose import Plan
from emm.fusion.fused import FusedModel
from emm.fusion.options import FuseOptions
from emm.fusion.procedure import FusePlan, FuseRunner
from emm.pipeline.decompose import load_pool_plan
from emm.train.compare import paired_auc_cis
from emm.train.predict import predict_logits
from emm.train.metrics import auc
from emm.train.trainer import FitResult

from harness.benchmarks.train_throughput import load_average
from harness.experiments.paired import best_key, collect
from harness.params import load_harness_params


def halves(rows: SplitTensors, seed: int) -> tuple[SplitTensors, SplitTensors]:
    """A seeded random half of the rows to fit on, the rest to early-stop on."""
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    fit, stop = perm[: len(rows) // 2], perm[len(rows) // 2:]

    def take(idx: torch.Tensor) -> SplitTensors:
        return SplitTensors(rows.sparse[idx], rows.dense[idx], rows.labels[idx], rows.task_names)
    return take(fit), take(stop)


def fuse_held_out(options: FuseOptions, decomposition: Plan, model_tasks: list[str], schema: Schema, seed: int,
                  fit_rows: SplitTensors, stop_rows: SplitTensors,
                  prepare_rows: SplitTensors | None = None) -> tuple[FusedModel, FitResult]:
    """The fuse procedure as the stage runs it (``FusePlan.from_options`` + ``FuseRunner``, the train seed set to
    ``seed``), fitted on ``fit_rows`` and early-stopped on ``stop_rows``, without checkpoints. The output head is
    prepared on ``prepare_rows`` (default: the fit rows)."""
    options = options.model_copy(update={"train": options.train.model_copy(update={"seed": seed})})
    runner = FuseRunner(FusePlan.from_options(options), decomposition, model_tasks, schema, progress=False,
                        desc=f"held-out seed {seed}")
    runner.prepare(lambda: fit_rows if prepare_rows is None else prepare_rows)
    return runner.model, runner.train(fit_rows, stop_rows).fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--config", default=None, help="the harness config (default harness/benchmark.yaml): "
                    "where the benchmark wrote its job stores")
    ap.add_argument("--dataset", default="census-income")
    ap.add_argument("--seeds", default=None, help="comma-separated (default: the full profile's seeds)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_harness_params(args.params, args.config)
    prof = cfg.benchmark.profiles["full"]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else prof.seeds
    tasks_key = "+".join(cfg.ingest.tasks.get(args.dataset) or [])
    work = Path(cfg.benchmark.out) / args.dataset / "raw" / "full" / tasks_key
    data_dir = work / "data"
    schema = Schema.load(data_dir)
    val, test = load_split(data_dir, "val", schema), load_split(data_dir, "test", schema)
    results = [json.loads(p.read_text())["result"] for p in sorted(work.glob("seed-*/results/*.json"))]
    scores = collect(results, tasks_key, schema.task_names)
    if scores is None:
        raise SystemExit(f"no stored scores under {work}: run `emm benchmark {args.dataset}` first")
    fuse_plan = FusePlan.from_options(cfg.fuse)
    print(f"{args.dataset}: fuse {cfg.fuse.akf.model_dump()}, phases {[p.name for p in fuse_plan.phases]}, target "
          f"{fuse_plan.target}; fitted on half of {len(val):,} val rows, "
          f"early-stopped on the other half; seeds {seeds}; {load_average()}")
    held: dict[int, np.ndarray] = {}
    for seed in seeds:
        seed_dir = work / f"seed-{seed}"
        plan, entries = load_pool_plan(data_dir, seed_dir / "pool", seed_dir / "components", cfg.decompose)
        fit_rows, stop_rows = halves(val, seed)
        started = time.perf_counter()
        model, fit = fuse_held_out(cfg.fuse, plan, [e.task for e in entries], schema, seed, fit_rows, stop_rows)
        held[seed] = predict_logits(model, test, cfg.fuse.train.eval_batch_size)
        aucs = {t: round(auc(test.labels[:, i].numpy(), held[seed][:, i]), 5) for i, t in enumerate(schema.task_names)}
        print(f"  seed {seed}: best epoch {fit.best_epoch} of {fit.epochs_run}, {time.perf_counter() - started:.0f} s, "
              f"test AUC {aucs}")
    for i, task in enumerate(schema.task_names):
        y = test.labels[:, i].numpy()
        best = best_key(scores, task, "pool:")
        against = {"donor stack (all val rows)": "donors:stack", "EMM fitted on train rows": "fused:full",
                   f"best donor ({best.split(':', 1)[1] if best else '?'})": best}
        pairs = {label: [(held[s][:, i], scores.test[s][task][key]) for s in seeds if key in scores.test[s][task]]
                 for label, key in against.items() if key}
        cis = paired_auc_cis(y, {k: v for k, v in pairs.items() if v})
        mean_auc = np.mean([auc(y, held[s][:, i]) for s in seeds])
        print(f"{task}: held-out EMM test AUC {mean_auc:.5f} (mean of {len(seeds)} seeds)")
        for label, ci in cis.items():
            per_seed = [auc(y, a) - auc(y, b) for a, b in pairs[label]]
            word = "above" if ci["low"] > 0 else "below" if ci["high"] < 0 else "not distinguishable"
            print(f"  − {label}: {ci['diff']:+.5f} [{ci['low']:+.5f}, {ci['high']:+.5f}] seed std "
                  f"{np.std(per_seed, ddof=1) if len(per_seed) > 1 else 0:.5f}: {word}")


if __name__ == "__main__":
    main()
