"""Does a stronger numeric encoding pay, for every model alike? Two benchmark profiles, paired row by row.

Why a comparison of two profiles: the encoding changes the pool itself (and so the fused model built on
it), not one fuse recipe, so the two arms are two whole benchmark runs on the same seeds and the same test
rows: ``numeric-minmax`` (the min-max values plus the dense buckets, as every model had them) and
``numeric-periodic`` (the same plus periodic PLR embeddings of each dense value, ``numeric: {mode:
periodic}``, in every pool model and in PLE; the fused model follows its pool). Run both first:

    emm benchmark census-income --profile numeric-minmax
    emm benchmark census-income --profile numeric-periodic
    python -m harness.benchmarks.numeric_encoding [--params params.yaml] [--dataset census-income]

``--arms A B`` pairs two other profiles the same way (B − A), e.g. ``--arms full numeric-quantile``: the
``full`` profile's pool, EMM, PLE and LightGBM run under today's default encoding (periodic), so its job
store is the periodic arm; ``numeric-quantile`` runs the PLR embeddings on quantile-normalised values.

It prints, and writes to ``results/<dataset>/numeric.md`` (another pair: ``<B>-vs-<A>.md``), per task and
model: test AUC under each encoding (mean ± std over seeds) and B − A (default: periodic − minmax) as a
paired bootstrap 95% CI (1,000 resamples of test rows, seed-matched, pooled over seeds), for the best donor (by validation AUC), the donor stack, EMM, PLE,
LightGBM (the same in both: a control that must read 0) and the EMM + LightGBM hybrid; and EMM − LightGBM
under B's encoding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from emm.data.spec import resolve_dataset
from emm.io import read_json
from emm.train.compare import paired_auc_cis
from emm.train.metrics import auc

from harness.experiments import paired
from harness.params import load_harness_params

ARMS = ("numeric-minmax", "numeric-periodic")  # the default pair: numeric.md
MODELS = {"best donor": None, "donor stack": "donors:stack", "EMM": paired.EMM, "PLE": "baseline:ple",
          "LightGBM": paired.LIGHTGBM, "hybrid EMM + LightGBM": paired.HYBRID_KEY}


def load_arm(cfg, dataset: str, profile: str, task_set: str, tasks: list[str]) -> paired.Scores:
    work = cfg.benchmark.out / dataset / "raw" / profile / task_set
    results = [read_json(p)["result"] for p in sorted(work.glob("seed-*/results/*.json"))]
    if not results:
        raise SystemExit(f"no results under {work}: run `emm benchmark {dataset} --profile {profile}` first")
    scores = paired.collect(results, task_set, tasks)
    if scores is None:
        raise SystemExit(f"{work}: no stored per-row scores")
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--config", default=None, help="the harness config (default harness/benchmark.yaml): "
                    "where the benchmark wrote its job stores")
    ap.add_argument("--dataset", default="census-income")
    ap.add_argument("--arms", nargs=2, default=list(ARMS), metavar=("A", "B"), help="profiles to pair: B − A")
    args = ap.parse_args()
    name_a, name_b = args.arms
    cfg = load_harness_params(args.params, args.config)
    tasks = list(cfg.ingest.tasks.get(args.dataset) or resolve_dataset(args.dataset, cfg.datasets).default_tasks)
    task_set = "+".join(tasks)
    arm_a, arm_b = (load_arm(cfg, args.dataset, a, task_set, tasks) for a in args.arms)
    if not np.array_equal(arm_a.y_test, arm_b.y_test):
        raise SystemExit("the two profiles' test rows differ: they must be ingested from the same raw files")
    seeds = sorted(set(arm_a.test) & set(arm_b.test))
    lines = [f"# Numeric encoding, {args.dataset}: `{name_b}` vs `{name_a}`, every model alike", "",
             f"Seeds {seeds}; test AUC mean ± std over seeds; **{name_b} − {name_a}** is a paired bootstrap 95% CI "
             f"({paired.N_RESAMPLES} resamples of the same test rows, seed-matched). Written by "
             f"`python -m harness.benchmarks.numeric_encoding --arms {name_a} {name_b}` from those profiles' job "
             "stores.", ""]
    for i, task in enumerate(tasks):
        y = arm_a.y_test[:, i]
        keys = {name: (key or paired.best_key(arm_a, task, "pool:"), key or paired.best_key(arm_b, task, "pool:"))
                for name, key in MODELS.items()}
        pairs, aucs = {}, {}
        for name, (k_a, k_b) in keys.items():
            got = [(arm_b.test[s][task][k_b], arm_a.test[s][task][k_a]) for s in seeds
                   if k_a in arm_a.test[s].get(task, {}) and k_b in arm_b.test[s].get(task, {})]
            if got:
                pairs[name] = got
                aucs[name] = ([auc(y, b) for _, b in got], [auc(y, a) for a, _ in got])
        gbm = [(arm_b.test[s][task][paired.EMM], arm_b.test[s][task][paired.LIGHTGBM]) for s in seeds
               if {paired.EMM, paired.LIGHTGBM} <= set(arm_b.test[s].get(task, {}))]
        vs_gbm = f"EMM ({name_b}) − LightGBM"
        comparisons = {**pairs, **({vs_gbm: gbm} if gbm else {})}
        cis = paired_auc_cis(y, comparisons, n_resamples=paired.N_RESAMPLES, confidence=paired.CONFIDENCE,
                             seed=paired.SEED)
        lines += [f"## {task}", "", f"| model | {name_a} | {name_b} | {name_b} − {name_a} [95% CI] |", "|---|---:|---:|---:|"]
        for name, (auc_a, auc_b) in aucs.items():
            ci = cis[name]
            lines.append(f"| {name} | {np.mean(auc_a):.5f} ± {np.std(auc_a, ddof=1):.5f} | "
                         f"{np.mean(auc_b):.5f} ± {np.std(auc_b, ddof=1):.5f} | "
                         f"{ci['diff']:+.5f} [{ci['low']:+.5f}, {ci['high']:+.5f}] |")
        if gbm:
            ci = cis[vs_gbm]
            lines += ["", f"{vs_gbm}: {ci['diff']:+.5f} [{ci['low']:+.5f}, {ci['high']:+.5f}]"]
        lines.append("")
    text = "\n".join(lines) + "\n"
    out = Path(cfg.benchmark.out) / args.dataset / ("numeric.md" if tuple(args.arms) == ARMS else f"{name_b}-vs-{name_a}.md")
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
