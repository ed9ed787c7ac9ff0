"""scarce.md / scarce.json / scarce.png: the scarce-label benchmark's numbers.

Per cell *group* (a cell without its seed: the headline groups have three seeds, the rest one) every row's
test AUC and the paired 95% bootstrap CI of EMM − that row (and of each recipe, e.g. ``cross_residual``, −
that row) on the same labelled test rows, seed-matched and pooled over the group's seeds
(``paired_auc_cis``, as Table I and the relatedness sweep do). Then the cost: the fuse stage's wall time
beside each MTL baseline's training time. The plot: test AUC against the labelled fraction, one panel per
relatedness level (synth) or scarce task (Census), and below it EMM − best donor / − cross-task stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emm.errors import EMMError
from emm.io import write_json
from emm.train.compare import paired_auc_cis

from harness.experiments import paired
from harness.experiments.plotting import pyplot
from harness.experiments.scarce_measure import (BEST_DONOR, CROSS_STACK, EMM, ORACLE, OWN_STACK, TIMED, other_label,
                                                recipe_label)
from harness.experiments.scarce_plan import Cell, ScarceProfile

PLOTTED_DIFFS = (BEST_DONOR, CROSS_STACK)


@dataclass
class Diff:
    subject: str
    against: str
    diff: float
    low: float
    high: float
    seed_std: float
    seeds: int


@dataclass
class Group:
    """One row of the summary: a cell over its seeds."""

    group: str
    task: str
    fraction: float
    shared_weight: float | None
    rare: bool
    headline: bool
    seeds: list[int]
    counts: dict[str, int]                 # labelled rows / positives (train, val, test)
    aucs: dict[str, list[float]] = field(default_factory=dict)
    diffs: list[Diff] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)   # mean over seeds
    picked: dict[str, list[str]] = field(default_factory=dict)  # best_donor / other_donor: the pool member per seed


def model_order(prof: ScarceProfile, records: list[dict[str, Any]]) -> list[str]:
    """The table's rows: the fused models first, the bars after, the oracle last."""
    seen = list(dict.fromkeys(m for r in records for m in r["aucs"]))
    first = [EMM, *(recipe_label(n) for n in sorted(prof.recipes)), BEST_DONOR, OWN_STACK, CROSS_STACK]
    others = [m for m in seen if m not in first and m != ORACLE]
    return [m for m in first if m in seen] + others + ([ORACLE] if ORACLE in seen else [])


def build_groups(prof: ScarceProfile, cells: list[Cell], records: list[dict[str, Any]],
                 cell_dir: Path) -> tuple[list[Group], list[str]]:
    models = model_order(prof, records)
    subjects = [m for m in (EMM, *(recipe_label(n) for n in sorted(prof.recipes))) if m in models]
    by_group: dict[str, list[tuple[Cell, dict[str, Any]]]] = {}
    for c, r in zip(cells, records):
        by_group.setdefault(c.group, []).append((c, r))
    groups = []
    for name, members in by_group.items():
        c0, r0 = members[0]
        g = Group(name, c0.task, c0.fraction, c0.shared_weight, c0.rare, c0.headline, [c.seed for c, _ in members],
                  {k: r0[k] for k in ("train_labelled", "train_positives", "val_labelled", "val_positives",
                                      "test_rows", "test_positives")})
        rows = [dict(np.load(cell_dir / f"{c.key}.npz")) for c, _ in members]
        y = rows[0]["__y__"]
        if any(not np.array_equal(r["__y__"], y) for r in rows):
            raise EMMError(f"scarce group {name!r}: its seeds were scored on different test rows; delete "
                           f"{cell_dir} and run again")
        g.aucs = {m: [r["aucs"][m] for _, r in members if m in r["aucs"]] for m in models}
        g.picked = {k: [r[k] for _, r in members if r.get(k)] for k in ("best_donor", "other_donor")}
        comparisons = {f"{s}|{m}": pairs for s in subjects for m in models if m != s and (pairs := [
            (row[s], row[m]) for row in rows if s in row and m in row])}
        if comparisons:
            cis = paired_auc_cis(y, comparisons, n_resamples=paired.N_RESAMPLES, confidence=paired.CONFIDENCE,
                                 seed=paired.SEED)
            for k, ci in cis.items():
                s, m = k.split("|", 1)
                per_seed = [r["aucs"][s] - r["aucs"][m] for _, r in members if s in r["aucs"] and m in r["aucs"]]
                g.diffs.append(Diff(s, m, ci["diff"], ci["low"], ci["high"],
                                    float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0, len(per_seed)))
        stages = dict.fromkeys(k for _, r in members for k in r["seconds"])
        g.seconds = {k: float(np.mean([r["seconds"][k] for _, r in members if k in r["seconds"]])) for k in stages}
        groups.append(g)
    return groups, models


def markdown(dataset: str, variant: str, prof: ScarceProfile, groups: list[Group], models: list[str],
             seconds: float, failed: dict[str, str]) -> str:
    subjects = [m for m in (EMM, *(recipe_label(n) for n in sorted(prof.recipes))) if m in models]
    other = next((m for m in models if m.endswith(" donor alone")), other_label("other task"))
    lines = [f"# When fusion pays: scarce labels ({dataset}, {variant})", "",
             "Each cell trains a pool, fuses it and trains every rival on data where the scarce task keeps its label "
             "on only the stated fraction of train and validation rows (the other task keeps every label); every "
             "model is scored on the scarce task's test rows, all of them labelled. Rows: **EMM** (the default fuse "
             f"settings){''.join(f', **{s}**' for s in subjects[1:])}; the **best donor** (by validation AUC); the "
             "**own-task stack** (logistic regression on the task's donors' validation logits) and the **cross-task "
             "stack** (on every donor's logits, the rich task's too), both fitted on the task's labelled validation "
             f"rows; **{other}** (the rich task's best donor's logit as the score); the MTL baselines and one "
             "LightGBM per task, trained with the same masked labels"
             + ("; the **oracle** (the true probabilities: the ceiling)." if ORACLE in models else "."), "",
             f"Seeds: {', '.join(map(str, prof.headline_seeds))} for the headline cells (marked ★), "
             f"{', '.join(map(str, prof.seeds))} elsewhere; AUCs are mean ± sample std over seeds. Differences are "
             f"paired on the same test rows, seed-matched and pooled over the cell's seeds; 95% CIs from "
             f"{paired.N_RESAMPLES} bootstrap resamples of test rows (**above** / below: the CI excludes 0; ≈: it "
             f"does not). The bootstrap covers test-row noise, not training randomness. Epoch cap: "
             f"{prof.max_epochs or 'as params.yaml'}. Wall time of this run: {seconds / 60:.1f} min.", "",
             "## Test AUC per cell", "",
             "| cell | seeds | labelled train rows (positives) | test positives | " + " | ".join(models) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(models)]
    for g in groups:
        lines.append(f"| {g.group}{' ★' if g.headline else ''} | {len(g.seeds)} | {g.counts['train_labelled']:,} "
                     f"({g.counts['train_positives']:,}) | {g.counts['test_positives']:,} | "
                     + " | ".join(paired.mean_text(g.aucs.get(m, []), 4) for m in models) + " |")
    lines.append("")
    for g in groups:
        lines += [f"## {g.group}{' ★' if g.headline else ''}", "",
                  f"Task {g.task}; seeds {g.seeds}; labelled validation rows {g.counts['val_labelled']:,} "
                  f"({g.counts['val_positives']:,} positive); test rows {g.counts['test_rows']:,}. Best donor: "
                  f"{', '.join(g.picked['best_donor']) or '—'}; the rich task's donor: "
                  f"{', '.join(g.picked['other_donor']) or '—'} (per seed).", "",
                  "| row | test AUC | " + " | ".join(f"{s} − row [95% CI]" for s in subjects) + " |",
                  "|---|---:|" + "---:|" * len(subjects)]
        for m in models:
            lines.append(f"| {m} | {paired.mean_text(g.aucs.get(m, []), 4)} | "
                         + " | ".join("" if m == s else paired.diff_text(g.diffs, s, m, 4) for s in subjects) + " |")
        lines.append("")
    rank = [*TIMED.values(), *(f"fuse ({n})" for n in sorted(prof.recipes))]  # the fuse columns first
    stages = sorted(dict.fromkeys(k for g in groups for k in g.seconds),
                    key=lambda k: rank.index(k) if k in rank else len(rank))
    lines += ["## Cost: wall seconds per stage (mean over the cell's seeds)", "",
              "The fuse stage (on a trained pool: its donors' training is the pool column) beside each MTL "
              "baseline's training, from scratch. Cells that share data (e.g. the two 100% Census cells) share "
              "these jobs.", "",
              "| cell | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for g in groups:
        lines.append(f"| {g.group} | " + " | ".join(f"{g.seconds[k]:.1f}" if k in g.seconds else "—"
                                                   for k in stages) + " |")
    if failed:
        lines += ["", "## Cells that failed (run again to retry them; finished cells are kept)", ""]
        lines += [f"- {key}: {why}" for key, why in failed.items()]
    return "\n".join(lines) + "\n"


def plot(groups: list[Group], models: list[str], path: Path) -> Path:
    plt = pyplot()
    swept = [g for g in groups if not g.rare]
    panels = list(dict.fromkeys((f"w={g.shared_weight:.1f}" if g.shared_weight is not None else g.task)
                                for g in swept)) or ["(no fraction sweep)"]
    fig, axes = plt.subplots(2, len(panels), figsize=(5.6 * len(panels), 7.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    colors = {m: ("k" if m == ORACLE else cmap(i % 10)) for i, m in enumerate(models)}
    for col, panel in enumerate(panels):
        rows = sorted((g for g in swept if (f"w={g.shared_weight:.1f}" if g.shared_weight is not None
                                            else g.task) == panel), key=lambda g: g.fraction)
        top, bottom = axes[0][col], axes[1][col]
        for m in models:
            have = [(g.fraction, np.mean(g.aucs[m])) for g in rows if g.aucs.get(m)]
            if have:
                top.plot(*zip(*have), marker="o", ls="--" if m == ORACLE else "-", color=colors[m], label=m)
        top.set_title(f"{panel}: test AUC of the scarce task")
        top.set_xlabel("labelled fraction of train/val rows")
        top.legend(fontsize=6)
        bottom.axhline(0, color="k", lw=0.8)
        for k, against in enumerate(PLOTTED_DIFFS):
            ds = [(g.fraction, d) for g in rows for d in g.diffs if d.subject == EMM and d.against == against]
            if ds:
                x = np.array([f for f, _ in ds]) * (1 + 0.04 * (k - 0.5))  # side by side, not on top
                y = np.array([d.diff for _, d in ds])
                err = np.array([[d.diff - d.low for _, d in ds], [d.high - d.diff for _, d in ds]])
                bottom.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"EMM − {against}")
        fracs = sorted({g.fraction for g in rows})
        for ax in (top, bottom):
            ax.set_xscale("log")
            if fracs:
                ax.set_xlim(fracs[0] / 1.6, fracs[-1] * 1.6)
                ax.set_xticks(fracs, [f"{f:.1%}" for f in fracs])
                ax.minorticks_off()
        bottom.set_title(f"{panel}: paired AUC difference, 95% CI")
        bottom.set_xlabel("labelled fraction of train/val rows")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(dataset: str, variant: str, prof: ScarceProfile, cells: list[Cell], records: list[dict[str, Any]],
                 cell_dir: Path, out_dir: Path, seconds: float, failed: dict[str, str] | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, models = build_groups(prof, cells, records, cell_dir)
    md = out_dir / "scarce.md"
    md.write_text(markdown(dataset, variant, prof, groups, models, seconds, failed or {}))
    js = out_dir / "scarce.json"
    write_json(js, {"dataset": dataset, "variant": variant, "seconds": round(seconds, 1), "models": models,
                    "stages": sorted(TIMED.values()), "groups": [asdict(g) for g in groups],
                    "failed": failed or {}})
    return [md, js, plot(groups, models, out_dir / "scarce.png")]
