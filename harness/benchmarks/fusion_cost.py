"""Is fusion cheaper than training a multi-task model from scratch? One run, the same data and trainer.

(a) the fuse stage alone on the given pool (``emm.pipeline.fuse.fuse``: build the AKF model on the
    frozen components, fit the donor blend when configured, train, evaluate, write ``fused/`` to a
    temporary folder), and (b) MMoE, PLE and AdaTT (``emm/models/baselines``, paper-sized) trained from
    scratch by the same ``Trainer`` with the same settings (``fuse.train`` of the params file), each to
    its best validation epoch (early stopping as in the pipeline). Reported per model: wall seconds to
    the end of its best epoch and in all (the patience epochs after it included), epochs, why it stopped
    (``emm.train.stopping``), test AUC per task, and training samples/s. The fuse stage scores its start (the
    donor blend) as epoch 0 and may keep it: its "to best" is then its setup (plan load, model build, blend fit).

Issue 25's two goals end the report, each as a ratio from this run: the fuse stage in all (setup, stack, every
epoch, scoring, the pruned save) within MMoE's fit to its best epoch (also shown against PLE's and AdaTT's), and
the fused model's training samples/s at least half MMoE's (also against PLE and AdaTT).

Samples/s are measured apart from the fits, interleaved in rounds (fused, mmoe, ple, adatt, fused,
...) over the same slice of the train split, medians reported: the machine's load moves sequential
fits, and interleaving spreads it over every model alike. ``--compile`` adds the fused model under
``torch.compile`` to those rounds (its first round, which compiles, is left out). ``--profile`` prints
torch.profiler's operator table for the fused model's training step, an audit of its autograd graph
(which parameters get gradients: none of the frozen ones should), and the step split into forward,
backward and optimizer, beside the same step with the frozen layers' outputs detached: the price of
the backward through the frozen layers, which autograd needs for the gradient w.r.t. their *input*
whenever something trainable (the fresh embedding, a lower AKF level) feeds them.

Needs ingest, pretrain and decompose:
    python -m harness.benchmarks.fusion_cost [--dataset census-income] [--params params.yaml] [--rounds 3]
                                             [--profile] [--compile] [--skip-fits] [--max-epochs N] [--fits mmoe,...]
                                             [--skip-rates]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split
from emm.fusion.procedure import FusePlan, FuseRunner
from emm.models.baselines.registry import build_baseline
from emm.pipeline.decompose import load_pool_plan
from emm.pipeline.fuse import fuse
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import Params, load_params
from emm.tracker import NullTracker
from emm.train.options import TrainConfig
from emm.train.trainer import Trainer

from harness.benchmarks.train_throughput import load_average

BASELINES = ("mmoe", "ple", "adatt")
WALL_GOAL_X, RATE_GOAL_X = 1.0, 0.5  # issue 25: fuse wall <= 1x MMoE's fit to its best epoch; >= 0.5x its samples/s


class EpochClock(NullTracker):
    """A tracker that only notes when each epoch's metrics arrive: the Trainer logs them once per epoch,
    after that epoch's validation, so ``at[e] - start`` is the wall time to the end of epoch ``e``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.at: dict[int, float] = {}
        self.setup: float = 0.0  # the fuse stage logs its params once the model is built, before training

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.setup = time.perf_counter() - self.start

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            self.at[step] = time.perf_counter() - self.start


def fit_scratch(name: str, schema: Schema, train: SplitTensors, val: SplitTensors, test: SplitTensors,
                cfg: TrainConfig) -> dict[str, Any]:
    """A baseline from scratch to its best validation epoch: timings, epochs, test AUC per task. It writes a
    checkpoint per epoch like the fuse stage does (into a temporary folder), so both pay for that alike."""
    torch.manual_seed(cfg.seed)
    clock = EpochClock()
    model = build_baseline(name, schema)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, cfg, checkpoint_dir=Path(tmp), tracker=clock, progress=False, desc=name)
        fit = trainer.fit(train, val)
    total = time.perf_counter() - clock.start
    test_m = trainer.evaluate(test)
    return {"name": name, "to_best_s": clock.at.get(fit.best_epoch, 0.0), "total_s": total,
            "best_epoch": fit.best_epoch, "epochs": fit.epochs_run, "test": {t: m["auc"] for t, m in test_m.items()},
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad), "stopped": fit.stopped}


def fit_fused(cfg: Params, dataset: str) -> dict[str, Any]:
    """The fuse stage itself (untracked, into a temporary folder): timings, epochs, test AUC per task."""
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        res = fuse(dataset, stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                   stage_dir(cfg, dataset, "components"), Path(tmp) / "fused", Path(tmp) / "work",
                   cfg.fuse.model_copy(update={"train": cfg.fuse.train.model_copy(update={"device": "cpu"})}),
                   cfg.decompose, tracker=clock, progress=False)
    total = time.perf_counter() - clock.start
    return {"name": "fused", "to_best_s": clock.at.get(res.fit.best_epoch, clock.setup), "total_s": total,
            "setup_s": clock.setup, "epoch_ends": dict(clock.at),
            "best_epoch": res.fit.best_epoch, "epochs": res.fit.epochs_run, "stopped": res.fit.stopped,
            "test": {t: m["auc"] for t, m in res.test.items()},
            "params": sum(p.numel() for p in res.model.parameters() if p.requires_grad)}


def fresh_fused(cfg: Params, dataset: str, schema: Schema) -> nn.Module:
    """The fused model the fuse stage starts from (the fuse runner builds it, seeded alike), untrained."""
    plan, entries = load_pool_plan(stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                                   stage_dir(cfg, dataset, "components"), cfg.decompose)
    return FuseRunner(FusePlan.from_options(cfg.fuse), plan, [e.task for e in entries], schema, progress=False).model


def epoch_rate(trainer: Trainer, data: SplitTensors, epoch: int) -> float:
    started = time.perf_counter()
    trainer.train_epoch(data, epoch=epoch)
    return len(data) / (time.perf_counter() - started)


def throughput(models: dict[str, nn.Module], data: SplitTensors, cfg: TrainConfig, rounds: int,
               warm: set[str]) -> dict[str, float]:
    """Median training samples/s per model over interleaved rounds (``warm``: drop the first round)."""
    trainers = {k: Trainer(m, cfg, progress=False, desc=k) for k, m in models.items()}
    rates: dict[str, list[float]] = {k: [] for k in models}
    for r in range(1, rounds + 1 + (1 if warm else 0)):
        for k, trainer in trainers.items():
            if k in warm and r == 1:
                started = time.perf_counter()
                epoch_rate(trainer, data, r)
                print(f"  {k}: first round (compiling) {time.perf_counter() - started:.0f}s")
                continue
            rates[k].append(epoch_rate(trainer, data, r))
        print("  round " + str(r) + ": " + "  ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items() if v))
    return {k: statistics.median(v) for k, v in rates.items()}


def frozen_modules(model: nn.Module) -> list[nn.Module]:
    """The fused model's frozen pieces: every level's components, and the donors' whole paths if kept."""
    mods: list[nn.Module] = [c for level in model.levels for c in level.components]
    if getattr(model, "donors", None) is not None:
        mods += list(model.donors.paths)
    return mods


def autograd_audit(model: nn.Module, batch: SplitTensors) -> str:
    """Walk the autograd graph of one training loss: which parameters get a gradient (AccumulateGrad
    leaves), and whether any frozen one does; how many backward nodes the step builds in all."""
    frozen = {id(p) for m in frozen_modules(model) for p in m.parameters()}
    model.train()
    loss = nn.functional.binary_cross_entropy_with_logits(model(batch.sparse, batch.dense), batch.labels)
    seen, stack, leaves = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad":
            leaves.append(node.variable)
        stack.extend(nxt for nxt, _ in node.next_functions)
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    bad = sum(1 for v in leaves if id(v) in frozen)
    return (f"autograd graph of one step: {len(seen)} nodes; {len(leaves)} parameters get a gradient "
            f"(the model has {trainable} trainable), frozen parameters among them: {bad} "
            f"(of {len(frozen)} frozen)")


def step_breakdown(model: nn.Module, data: SplitTensors, cfg: TrainConfig, steps: int = 30) -> dict[str, dict[str, float]]:
    """Median ms of forward, backward and optimizer step, for the fused model as it is ("fused") and with
    every frozen module's output detached ("detached"), alternating step by step (the machine's load
    falls on both alike).

    Detached is not the model (the gradient to what feeds the frozen layers, the fresh embedding and
    lower AKF levels, is lost): it only measures what the backward through the frozen layers costs.
    """
    cut = {"on": False}
    handles = [m.register_forward_hook(lambda mod, a, out: out.detach() if cut["on"] else None)
               for m in frozen_modules(model)]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "backward": [], "optimizer": []}
                                                for k in ("fused", "detached")}
    model.train()
    gen = torch.Generator().manual_seed(0)
    try:
        for step in range(2 * (steps + 3)):
            cut["on"] = bool(step % 2)
            idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
            sparse, dense, labels = data.sparse[idx], data.dense[idx], data.labels[idx]
            t0 = time.perf_counter()
            loss = nn.functional.binary_cross_entropy_with_logits(model(sparse, dense), labels)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if step >= 6:  # warm-up steps left out
                for key, seconds in zip(("forward", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2)):
                    times["detached" if cut["on"] else "fused"][key].append(1e3 * seconds)
    finally:
        for h in handles:
            h.remove()
    return {k: {part: statistics.median(v) for part, v in parts.items()} for k, parts in times.items()}


def profile_step(model: nn.Module, data: SplitTensors, cfg: TrainConfig, steps: int = 20, top: int = 14) -> str:
    """torch.profiler's operator table (self CPU time) over ``steps`` of the Trainer's own loop."""
    return Trainer(model, cfg, progress=False, desc="fused").profile_epoch(data, steps, epoch=90, top=top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rate-rows", type=int, default=50_000, help="train rows each samples/s round uses")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time the fused model under torch.compile")
    parser.add_argument("--skip-fits", action="store_true", help="only samples/s (and the profile)")
    parser.add_argument("--max-epochs", type=int, default=0, help="cap every fit at this many epochs (0: fuse.train's)")
    parser.add_argument("--fits", default="fused," + ",".join(BASELINES), help="which fits to run (comma-separated)")
    parser.add_argument("--skip-rates", action="store_true", help="no samples/s rounds (only the fits)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_params(args.params)
    data_dir = stage_dir(cfg, args.dataset, "data")
    schema = Schema.load(data_dir)
    train, val, test = (load_split(data_dir, s, schema) for s in ("train", "val", "test"))
    if args.max_epochs:  # the same cap for the fuse stage and the baselines
        cfg = cfg.model_copy(update={"fuse": cfg.fuse.model_copy(update={"train": cfg.fuse.train.model_copy(
            update={"max_epochs": args.max_epochs})})})
    tcfg = cfg.fuse.train.model_copy(update={"device": "cpu"})
    print(f"{args.dataset}: train {len(train):,} / val {len(val):,} / test {len(test):,} rows; batch {tcfg.batch_size}, "
          f"lr {tcfg.lr}, patience {tcfg.patience}, max {tcfg.max_epochs} epochs; fuse: {cfg.fuse.akf.model_dump()}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"load before: {load_average()}")

    fits = [f for f in args.fits.split(",") if f]
    unknown = sorted(set(fits) - {"fused", *BASELINES})
    if unknown:
        raise SystemExit(f"--fits: unknown {unknown}; choose from fused,{','.join(BASELINES)}")
    rates = {} if args.skip_rates else report_rates(cfg, args, schema, train, tcfg)
    if args.profile:
        report_profile(cfg, args, schema, train, tcfg)
    walls = {} if args.skip_fits else report_fits(cfg, args, schema, (train, val, test), tcfg, fits)
    print(f"load after: {load_average()}")
    report_goals(rates, walls)


def report_goals(rates: dict[str, float], walls: dict[str, dict[str, Any]]) -> None:
    """Issue 25's two goals as ratios from this run (each only when its measurements were made)."""
    print("\ngoals:")
    if "fused" in walls and "mmoe" in walls:
        fused = walls["fused"]["total_s"]
        ratios = {k: fused / walls[k]["to_best_s"] for k in BASELINES if k in walls}
        print(f"  fuse stage wall {fused:.1f}s <= {WALL_GOAL_X:g}x MMoE's fit to its best epoch "
              f"({walls['mmoe']['to_best_s']:.1f}s): {'met' if ratios['mmoe'] <= WALL_GOAL_X else 'NOT met'} "
              f"({ratios['mmoe']:.2f}x); vs each fit to its best epoch: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    else:
        print("  fuse stage wall: not measured (needs --fits with fused and mmoe, without --skip-fits)")
    if rates:
        ratios = {k: rates["fused"] / rates[k] for k in BASELINES}
        print(f"  fused training samples/s {rates['fused']:,.0f} >= {RATE_GOAL_X:g}x MMoE's ({rates['mmoe']:,.0f}): "
              f"{'met' if ratios['mmoe'] >= RATE_GOAL_X else 'NOT met'} ({ratios['mmoe']:.2f}x); vs each: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    else:
        print("  fused training samples/s: not measured (--skip-rates)")


def report_rates(cfg: Params, args: argparse.Namespace, schema: Schema, train: SplitTensors,
                 tcfg: TrainConfig) -> dict[str, float]:
    """Training samples/s of every model in interleaved rounds (median per model, returned)."""
    print(f"\ntraining samples/s ({args.rate_rows:,} train rows per round, {args.rounds} interleaved rounds):")
    models: dict[str, nn.Module] = {"fused": fresh_fused(cfg, args.dataset, schema)}
    for name in BASELINES:
        torch.manual_seed(tcfg.seed)
        models[name] = build_baseline(name, schema)
    warm = set()
    if args.compile:
        models["fused-compiled"] = torch.compile(fresh_fused(cfg, args.dataset, schema))
        warm.add("fused-compiled")
    rates = throughput(models, train.head(args.rate_rows), tcfg, args.rounds, warm)
    for k, v in rates.items():
        print(f"  {k:15s} {v:10,.0f} samples/s   {v / rates['mmoe']:5.2f}x MMoE")
    return rates


def report_profile(cfg: Params, args: argparse.Namespace, schema: Schema, train: SplitTensors,
                   tcfg: TrainConfig) -> None:
    """Where the fused model's training step goes, and whether any frozen parameter gets a gradient."""
    fused = fresh_fused(cfg, args.dataset, schema)
    print("\nfused model, training step (torch.profiler, 20 steps of the Trainer, self CPU time):")
    print(profile_step(fused, train, tcfg))
    print(autograd_audit(fused, train.head(tcfg.batch_size)))
    split = step_breakdown(fused, train, tcfg)
    full, cut = split["fused"], split["detached"]
    print("median ms per step (alternating) forward  backward  optimizer")
    print(f"  fused                           {full['forward']:7.2f}  {full['backward']:8.2f}  {full['optimizer']:9.2f}")
    print(f"  frozen outputs detached         {cut['forward']:7.2f}  {cut['backward']:8.2f}  {cut['optimizer']:9.2f}"
          "   (a measure, not a model: cuts the gradient to what feeds the frozen layers)")



def report_fits(cfg: Params, args: argparse.Namespace, schema: Schema, splits: tuple[SplitTensors, ...],
                tcfg: TrainConfig, fits: list[str]) -> dict[str, dict[str, Any]]:
    """Each model to its best validation epoch, one after the other: wall, epochs, test AUC (returned by name)."""
    train, val, test = splits
    print("\nfits to the best validation epoch (one after the other):")
    results = []
    for name in sorted(fits, key=["mmoe", "fused", "ple", "adatt"].index):  # the pair the target compares first
        results.append(fit_fused(cfg, args.dataset) if name == "fused"
                       else fit_scratch(name, schema, train, val, test, tcfg))
        print(f"  {name} done ({results[-1]['total_s']:.0f}s); load {load_average()}", flush=True)
    tasks = schema.task_names
    if "fused" in fits:
        fused = next(r for r in results if r["name"] == "fused")
        ends = ", ".join(f"{e} at {s:.1f}s" for e, s in sorted(fused["epoch_ends"].items()))
        print(f"\n  (fused: from the stage's start: setup (plan load, model build, donor stack) {fused['setup_s']:.1f}s; "
              f"epochs ended (validation scored) {ends or 'none'}; then test scoring, pruning and the save, to "
              f"{fused['total_s']:.1f}s)")
    print(f"  {'model':8s} {'to best s':>9s} {'total s':>8s} {'best/run':>9s} {'stopped':>14s} {'trainable':>10s} "
          + " ".join(f"{'test ' + t:>14s}" for t in tasks))
    for r in results:
        print(f"  {r['name']:8s} {r['to_best_s']:9.1f} {r['total_s']:8.1f} {r['best_epoch']:>4d}/{r['epochs']:<4d} "
              f"{r['stopped']:>14s} {r['params']:10,d} " + " ".join(f"{r['test'][t]:14.5f}" for t in tasks))
    return {r["name"]: r for r in results}


if __name__ == "__main__":
    main()
