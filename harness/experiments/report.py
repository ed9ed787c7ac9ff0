"""Benchmark results -> Table I (md + csv), Table II (md), Figure 3 (md + png), per-task bar charts (the
fusion-gate selection heat maps: ``harness.experiments.selection``). Every number is a mean ± sample std over seeds; the paper's numbers sit in
adjacent columns; the header says how many rows the data had, so a sample is never mistaken for the dataset.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emm.data.schema import Schema
from emm.fusion.options import ABLATIONS

from harness.experiments import paired, paper
from harness.experiments.members import NETWORKS_EMM, is_tree_result
from harness.experiments.plotting import pyplot
from harness.experiments.selection import write_selection

DISPLAY = {"shared_bottom": "SharedBottom", "mmoe": "MMoE", "ple": "PLE", "aitm": "AITM", "adatt": "AdaTT",
           "lightgbm": "LightGBM (one per task)", NETWORKS_EMM: "EMM (fused, networks only)",
           **{a.name: a.label for a in ABLATIONS.values()}}
SINGLE_MEAN, BEST_DONOR = "single-task mean", "best single-task donor"
FEW_POSITIVES = 100  # below this many positive test rows an AUC is too noisy to rank methods


@dataclass
class Cell:
    values: list[float]

    @property
    def n(self) -> int:
        return len([v for v in self.values if not math.isnan(v)])

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return float(np.mean(finite)) if finite else math.nan

    @property
    def std(self) -> float:
        finite = [v for v in self.values if not math.isnan(v)]
        return float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0

    def text(self) -> str:
        if self.n == 0:
            return "n/a"
        return f"{self.mean:.5f} ± {self.std:.5f}" if self.n > 1 else f"{self.mean:.5f}"


@dataclass
class Row:
    name: str
    kind: str                     # pool | tree | reference | donors | baseline | lightgbm | emm | networks | hybrid
    cells: dict[str, Cell]        # task -> test AUC over seeds
    paper_key: str | None = None
    short: str = ""               # how the verdict names the row ("EMM" for EMM's), else its name


def _aucs(results: list[dict[str, Any]], task_set: str, kind: str, method: str) -> dict[str, Cell]:
    cells: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r["task_set"] == task_set and r["kind"] == kind and r["method"] == method:
            for task, m in r["tasks"].items():
                cells[task].append(float(m["test_auc"]))
    return {t: Cell(v) for t, v in cells.items()}


def _methods(results: list[dict[str, Any]], task_set: str, kind: str) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["task_set"] == task_set and r["kind"] == kind and r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _donor_summary(results: list[dict[str, Any]], task_set: str, tasks: list[str]) -> tuple[Row, Row]:
    """Per seed, the mean of the pool's networks (the paper's single-task models: a tree member is left out of
    the Gains' reference) and the best of every pool model of each task; then mean ± std over seeds."""
    per_seed: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    networks: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r["task_set"] == task_set and r["kind"] == "pool":
            for task, m in r["tasks"].items():
                per_seed[r["seed"]][task].append(float(m["test_auc"]))
                if not is_tree_result(r):
                    networks[r["seed"]][task].append(float(m["test_auc"]))
    mean_cells = {t: Cell([float(np.mean(s[t])) for s in networks.values() if s.get(t)]) for t in tasks}
    best_cells = {t: Cell([float(np.max(s[t])) for s in per_seed.values() if s.get(t)]) for t in tasks}
    return Row(SINGLE_MEAN, "reference", mean_cells, "single-task mean"), Row(BEST_DONOR, "reference", best_cells)


def tree_members(results: list[dict[str, Any]], task_set: str) -> list[str]:
    """The pool's tree members (LightGBM, joining EMM at the output) in ``task_set``, in job order."""
    return list(dict.fromkeys(r["method"] for r in results if r["task_set"] == task_set and is_tree_result(r)))


def table1_rows(results: list[dict[str, Any]], task_set: str, tasks: list[str],
                scores: paired.Scores | None = None) -> list[Row]:
    """``scores``: the task set's stored per-row scores (``paired.collect``), read here when not given."""
    trees = tree_members(results, task_set)
    rows = [Row(m, "tree" if m in trees else "pool", _aucs(results, task_set, "pool", m))
            for m in _methods(results, task_set, "pool")]
    rows += list(_donor_summary(results, task_set, tasks))
    built = paired.donor_aucs(scores or paired.collect(results, task_set, tasks))
    hybrids = {paired.HYBRID, paired.DONOR_HYBRID}
    rows += [Row(name, "donors", {t: Cell(v) for t, v in cells.items()})
             for name, cells in built.items() if cells and name not in hybrids]
    rows += [Row(DISPLAY.get(m, m), "baseline", _aucs(results, task_set, "baseline", m), m)
             for m in _methods(results, task_set, "baseline")]
    if _methods(results, task_set, "lightgbm"):
        rows.append(Row(DISPLAY["lightgbm"], "lightgbm", _aucs(results, task_set, "lightgbm", "lightgbm")))
    networks = _aucs(results, task_set, "fused", NETWORKS_EMM)
    if networks:  # tree members: EMM with them beside the same recipe on the networks alone (the paper's EMM)
        rows.append(Row(DISPLAY[NETWORKS_EMM], "networks", networks, "emm"))
    emm = _aucs(results, task_set, "fused", "full")
    rows.append(Row(paired.TREE_EMM, "emm", emm) if trees else Row(DISPLAY["full"], "emm", emm, "emm", short="EMM"))
    rows += [Row(name, "hybrid", {t: Cell(v) for t, v in built[name].items()})  # not neural-only: reported apart
             for name in (paired.DONOR_HYBRID, paired.HYBRID) if built.get(name)]
    return rows


def _fmt(x: float | None, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:+.5f}" if sign else f"{x:.5f}"


def _mean_over_tasks(row: Row, tasks: list[str]) -> float:
    values = [row.cells[t].mean for t in tasks if t in row.cells]
    return float(np.mean(values)) if len(values) == len(tasks) else math.nan


def data_line(schema: Schema, seeds: list[int]) -> str:
    rows = schema.rows
    pos = {t.name: t.positives.get("test", 0) for t in schema.tasks}
    line = (f"Data: **{schema.dataset}**, train {rows['train']:,} / val {rows['val']:,} / test {rows['test']:,} rows "
            f"(test positives: {', '.join(f'{t} {n:,}' for t, n in pos.items())}); seeds {', '.join(map(str, seeds))}.")
    few = [t for t, n in pos.items() if n < FEW_POSITIVES]
    if few:
        line += (f"\n\n> **Small sample, not the full dataset**: task(s) {few} have fewer than {FEW_POSITIVES} positive "
                 f"test rows, so these AUCs are noise-dominated and not comparable with the paper's numbers.")
    return line


def write_table1(dataset: str, rows: list[Row], tasks: list[str], header: str, out_dir: Path,
                 pairs: list[paired.PairedRow] | None = None) -> tuple[Path, Path]:
    """Table I as markdown and csv; ``pairs``, EMM's paired CIs, add a section and ``paired_ci`` csv rows."""
    ref = next(r for r in rows if r.name == SINGLE_MEAN)
    pairs = pairs or []
    lines = [f"# Table I: {dataset}", "", header, "",
             "Test AUC, mean ± sample std over seeds. Gain = AUC − single-task mean (the paper's definition). "
             "`paper` = the paper's Table I. The donor ensemble and stack are built per seed from that seed's "
             "pool models.", "", *trees_note(rows),
             "| model | " + " | ".join(f"{t} AUC | {t} Gain | {t} paper" for t in tasks) + " | mean AUC |",
             "|---|" + "---:|---:|---:|" * len(tasks) + "---:|"]
    csv_rows = []
    for row in rows:
        cells = []
        for t in tasks:
            cell = row.cells.get(t)
            if cell is None:
                cells += ["—", "", ""]
                continue
            gain = None if row.kind in ("pool", "tree", "reference") else cell.mean - ref.cells[t].mean
            p = paper.table1(row.paper_key, dataset, t) if row.paper_key else None
            cells += [cell.text(), _fmt(gain, sign=True), _fmt(p)]
            csv_rows.append({"model": row.name, "kind": row.kind, "task": t, "auc_mean": _fmt(cell.mean),
                             "auc_std": _fmt(cell.std), "seeds": cell.n, "gain": _fmt(gain), "paper_auc": _fmt(p)})
        name = f"**{row.name}**" if row.kind == "emm" else row.name
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(_mean_over_tasks(row, tasks))} |")
    lines += ["", *paired.ci_section(pairs, tasks, DISPLAY), *verdict(rows, tasks), *paired.ci_verdict(pairs, DISPLAY)]
    md, csv_path = out_dir / "table1.md", out_dir / "table1.csv"
    md.write_text("\n".join(lines) + "\n")
    csv_rows += paired.csv_rows(pairs, DISPLAY)
    with open(csv_path, "w", newline="") as fh:
        fields = list(dict.fromkeys(k for r in csv_rows for k in r)) or ["model"]
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(csv_rows)
    return md, csv_path


def trees_note(rows: list[Row]) -> list[str]:
    """What Table I's EMM rows are when the pool has tree members (nothing without them)."""
    trees = [r.name for r in rows if r.kind == "tree"]
    if not trees:
        return []
    return [f"Tree members {', '.join(f'`{t}`' for t in trees)} (LightGBM, `arch: lightgbm`, trained on each seed "
            "as `emm pretrain` trains them) cannot be cut: they join the fused model at the output, each one more "
            f"donor in its task's blend. **{paired.TREE_EMM}** fuses the whole pool; **{DISPLAY[NETWORKS_EMM]}** is "
            "the same recipe on the pool's networks alone (the paper's EMM: its `paper` column). The single-task mean, "
            "the Gains' reference, is the networks' (the paper's single-task models); the best donor, the donor "
            "ensemble and the donor stack take the tree members too.", ""]


def verdict(rows: list[Row], tasks: list[str]) -> list[str]:
    """Plain sentences: does EMM beat every baseline, its best donor, LightGBM? By how much, if not?"""
    emm = next((r for r in rows if r.kind == "emm"), None)
    if emm is None or not emm.cells:
        return ["EMM did not produce a result."]
    out = ["## Verdict", ""]
    who = emm.short or emm.name
    emm_mean = _mean_over_tasks(emm, tasks)
    for r in rows:
        if r.kind in ("baseline", "lightgbm"):
            diff = emm_mean - _mean_over_tasks(r, tasks)
            per_task = ", ".join(f"{t} {emm.cells[t].mean - r.cells[t].mean:+.5f}" for t in tasks if t in r.cells)
            word = "beats" if diff > 0 else "loses to"
            out.append(f"- {who} {word} {r.name} on the mean of the tasks by {abs(diff):.5f} ({per_task}).")
    donor = next(r for r in rows if r.name == BEST_DONOR)
    for t in tasks:
        diff = emm.cells[t].mean - donor.cells[t].mean
        side = "above" if diff >= 0 else "below"
        out.append(f"- {t}: {who} is {side} its best single-task donor by {abs(diff):.5f}.")
    return out


def table2_seeds(results: list[dict[str, Any]], task_set: str) -> list[int]:
    """The seeds every Table II variant ran on (a profile may run the ablations on fewer seeds than EMM):
    the table compares the variants on these alone, so a gain is never a difference of seed sets."""
    variants = [a for a in _methods(results, task_set, "fused") if a in ABLATIONS]
    ran = [{r["seed"] for r in results if r["task_set"] == task_set and r["kind"] == "fused" and r["method"] == a}
           for a in variants]
    return sorted(set.intersection(*ran)) if ran else []


def write_table2(dataset: str, results: list[dict[str, Any]], task_set: str, tasks: list[str], header: str,
                 out_dir: Path) -> Path:
    ablations = [a for a in ABLATIONS if a in _methods(results, task_set, "fused")]
    seeds = table2_seeds(results, task_set)
    every_seed = sorted({r["seed"] for r in results if r["task_set"] == task_set and r["kind"] == "fused"
                         and r["method"] in ABLATIONS})
    on_seeds = [r for r in results if r["seed"] in seeds]
    cells = {a: _aucs(on_seeds, task_set, "fused", a) for a in ablations}
    base = cells.get("baseline")
    seed_note = ([f"**Seeds {', '.join(map(str, seeds))} only** (the profile's `ablation_seeds`): every variant on "
                  f"the same seeds, so EMM's row here is not Table I's mean over {len(every_seed)} seeds.", ""]
                 if seeds != every_seed else [])
    names = {**DISPLAY, "full": paired.TREE_EMM} if tree_members(results, task_set) else DISPLAY
    lines = [f"# Table II: ablation, {dataset}", "", header, "", *seed_note,
             "baseline = the fused architecture with random, trainable components and no MTM; +MTM adds the "
             "attention; +p uses the trained, frozen pool components without MTM; EMM = both. Gain = AUC − "
             "baseline. `paper` = the paper's Table II. Under `output donor_residual` (see the header) every variant "
             "is the donors' blend plus that variant's AKF residual, which starts at zero; the paper's variants "
             "have no blend (`output tower`).", "",
             "| variant | " + " | ".join(f"{t} AUC | {t} Gain | {t} paper" for t in tasks) + " |",
             "|---|" + "---:|---:|---:|" * len(tasks)]
    for a in ablations:
        row = []
        for t in tasks:
            c = cells[a].get(t, Cell([]))
            gain = None if base is None or a == "baseline" else c.mean - base[t].mean
            row += [c.text(), _fmt(gain, sign=True), _fmt(paper.table2(a, dataset, t))]
        lines.append(f"| {names[a]} | " + " | ".join(row) + " |")
    path = out_dir / "table2.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_table1(rows: list[Row], tasks: list[str], path: Path, title: str) -> Path:
    """One panel per task: horizontal bars with ± std error bars, EMM highlighted, zoomed to the spread."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 0.42 * len(rows) + 1.6), squeeze=False)
    colors = {"pool": "#adb5bd", "reference": "#6c757d", "donors": "#495057", "baseline": "#4c6ef5",
              "lightgbm": "#2b8a3e", "tree": "#8ce99a", "emm": "#d9480f", "networks": "#ffa94d",
              "hybrid": "#e8590c"}
    for ax, task in zip(axes[0], tasks):
        shown = [r for r in rows if task in r.cells and r.cells[task].n]
        means = [r.cells[task].mean for r in shown]
        stds = [r.cells[task].std for r in shown]
        ax.barh([r.name for r in shown], means, xerr=stds, color=[colors.get(r.kind, "#868e96") for r in shown],
                capsize=3)
        if means:
            lo, hi = min(m - s for m, s in zip(means, stds)), max(m + s for m, s in zip(means, stds))
            pad = max(hi - lo, 1e-4)
            ax.set_xlim(lo - pad * 0.6, hi + pad * 0.6)
        ax.invert_yaxis()
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_title(f"{task}: test AUC")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure3_rows(results: list[dict[str, Any]], task_set: str, tasks: list[str],
                 scores: paired.Scores | None = None) -> list[Row]:
    rows = [r for r in table1_rows(results, task_set, tasks, scores)
            if r.kind not in ("pool", "tree") and r.name != BEST_DONOR]
    return [r for r in rows if r.cells]


def write_figure3(dataset: str, results: list[dict[str, Any]], task_sets: dict[str, list[str]], header: str,
                  out_dir: Path) -> list[Path]:
    """The 3- and 4-task runs (paper Figure 3): a table and a grid of per-task bar panels."""
    if not task_sets:
        return []
    lines = [f"# Figure 3: more tasks, {dataset}", "", header, ""]
    plt = pyplot()
    width = max(len(t) for t in task_sets.values())
    fig, axes = plt.subplots(len(task_sets), width, figsize=(3.6 * width, 3.4 * len(task_sets)), squeeze=False)
    for i, (ts, tasks) in enumerate(task_sets.items()):
        scores = paired.collect(results, ts, tasks)  # read once: the rows and the paired CIs below
        rows = figure3_rows(results, ts, tasks, scores)
        lines += [f"## {len(tasks)} tasks: {', '.join(tasks)}", "",
                  "| model | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
        for r in rows:
            lines.append(f"| {r.name} | " + " | ".join(r.cells[t].text() if t in r.cells else "—" for t in tasks)
                         + f" | {_fmt(_mean_over_tasks(r, tasks))} |")
        lines.append("")
        pairs = paired.paired_rows(scores)
        if pairs:  # the same bars as Table I's, on this task set's seeds and test rows
            lines += [("#" + line if line.startswith("## ") else line)
                      for line in paired.ci_section(pairs, tasks, DISPLAY)]
        for j in range(width):
            ax = axes[i][j]
            if j >= len(tasks):
                ax.axis("off")
                continue
            t = tasks[j]
            shown = [r for r in rows if t in r.cells and r.cells[t].n]
            means = [r.cells[t].mean for r in shown]
            ax.bar(range(len(shown)), means, yerr=[r.cells[t].std for r in shown], capsize=2,
                   color=["#d9480f" if r.kind == "emm" else "#4c6ef5" if r.kind == "baseline" else "#868e96"
                          for r in shown])
            ax.set_xticks(range(len(shown)), [r.name.split(" (")[0] for r in shown], rotation=60, ha="right",
                          fontsize=7)
            if means:
                lo, hi = min(means), max(means)
                pad = max(hi - lo, 1e-4)
                ax.set_ylim(lo - pad, hi + pad * 0.5)
            ax.set_title(f"{len(tasks)} tasks: {t}", fontsize=9)
    fig.tight_layout()
    png = out_dir / "figure3.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    md = out_dir / "figure3.md"
    lines.append("![Figure 3](figure3.png)")
    md.write_text("\n".join(lines) + "\n")
    return [md, png]


def write_reports(dataset: str, profile: str, results: list[dict[str, Any]], schemas: dict[str, Schema],
                  main_set: str, out_dir: Path, seconds: float | None = None,
                  recipe: dict[str, Any] | None = None) -> list[Path]:
    """Write every table and plot of one benchmark into ``out_dir``; returns the files written. ``recipe``:
    the fuse settings EMM's rows were trained with, named in every header (a table of a fused model means
    little without them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    main_tasks = schemas[main_set].task_names
    seeds = sorted({r["seed"] for r in results if r["task_set"] == main_set})
    trained = [r for r in results if r["kind"] != "decompose"]
    reused = sum(1 for r in trained if r.get("reused"))
    compute_min = sum(r.get("wall_seconds", 0) for r in trained) / 60
    header = data_line(schemas[main_set], seeds) + f" Profile `{profile}`: {len(trained)} training runs, " \
        f"{compute_min:.0f} worker-minutes in all" + (
            f"; this report's run took {seconds / 60:.1f} min wall" if seconds is not None else "") + (
            f" and reused {reused} finished runs from an earlier one." if reused else ".")
    if recipe:
        header += " EMM's recipe (params.yaml `fuse`): " + ", ".join(f"{k} `{v}`" for k, v in recipe.items()) + "."
    scores = paired.collect(results, main_set, main_tasks)
    rows = table1_rows(results, main_set, main_tasks, scores)
    files = [*write_table1(dataset, rows, main_tasks, header, out_dir, paired.paired_rows(scores))]
    files.append(plot_table1(rows, main_tasks, out_dir / "table1.png", f"{dataset}: test AUC over seeds {seeds}"))
    files.append(write_table2(dataset, results, main_set, main_tasks, header, out_dir))
    extra = {ts: s.task_names for ts, s in schemas.items() if ts != main_set}
    extra_header = "\n\n".join(data_line(schemas[ts], sorted({r["seed"] for r in results if r["task_set"] == ts}))
                               for ts in extra)
    files += write_figure3(dataset, results, extra, extra_header, out_dir)
    files += write_selection({ts: s.task_names for ts, s in schemas.items()}, results, out_dir)
    files.append(write_runs(results, out_dir / "runs.csv"))
    return files


def write_runs(results: list[dict[str, Any]], path: Path) -> Path:
    """Every single run (one line per run and task), the raw material of all tables above."""
    fields = ["task_set", "kind", "method", "seed", "task", "val_auc", "test_auc", "epochs_run", "best_epoch",
              "seconds"]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for r in results:
            for task, m in r.get("tasks", {}).items():
                writer.writerow({"task_set": r["task_set"], "kind": r["kind"], "method": r["method"], "seed": r["seed"],
                                 "task": task, "val_auc": _fmt(m.get("val_auc")), "test_auc": _fmt(m.get("test_auc")),
                                 "epochs_run": r.get("epochs_run", ""), "best_epoch": r.get("best_epoch", ""),
                                 "seconds": r.get("seconds", "")})
    return path
