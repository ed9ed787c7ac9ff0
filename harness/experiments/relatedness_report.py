"""relatedness.md / .csv / .png: the relatedness sweep's numbers, one table and one plot.

The plot has one column per task: on top every model's test AUC against the planted relatedness with the
oracle as the ceiling; below the paired differences (fused − best donor, fused − donor ensemble) with their
95% CIs, so "does fusion pay more as tasks get more related" reads off one picture.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from emm.data.options import SynthConfig

from harness.experiments import paired
from harness.experiments.plotting import pyplot
from harness.experiments.relatedness_measure import BARS, EMM_LABEL, Level
from harness.params import RelatednessConfig

PLOTTED_DIFFS = ("best donor", "donor ensemble")


def write_report(levels: list[Level], rc: RelatednessConfig, synth: SynthConfig, out_dir: Path, seconds: float,
                 train_seconds: float) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    subjects = [EMM_LABEL, *sorted(rc.recipes)]
    models = [*subjects, *BARS]
    tasks = list(dict.fromkeys(lv.task for lv in levels))
    lines = [f"# Where fusion pays: task relatedness sweep ({synth.dataset})", "",
             f"`emm relatedness`: at each planted relatedness `synth.shared_weight` = w (the share of each task's "
             f"signal from a latent both tasks see; 0 = the tasks share only the structural link \"no conversion "
             f"without a click\") a {synth.rows:,}-row table is generated, a pool trained, decomposed and fused. "
             f"Seeds {rc.seeds}; recipes beside EMM's default: "
             f"{json.dumps(rc.recipes, sort_keys=True) if rc.recipes else 'none'}. "
             f"Sweep wall time {seconds / 60:.1f} min ({train_seconds / 60:.1f} worker-min of training run now; "
             "reused jobs cost nothing).", "",
             "**oracle** is the AUC of the true probabilities on the same test rows: the ceiling. "
             "**relation** is the AUC of click's true probability as a score for conversion (how much one task's "
             "knowledge ranks the other's positives). Differences are paired on the same test rows, seed-matched; "
             f"95% CIs from {paired.N_RESAMPLES} bootstrap resamples of test rows (above / below = the CI excludes 0, "
             "≈ = it does not). The best donor is chosen by validation AUC.", ""]
    for task in tasks:
        rows = [lv for lv in levels if lv.task == task]
        lines += [f"## {task}", "",
                  "| w | relation | positives (test) | oracle | " + " | ".join(models) + " |",
                  "|---:|---:|---:|---:|" + "---:|" * len(models)]
        for lv in rows:
            lines.append(f"| {lv.shared_weight:.2f} | {lv.relation_auc:.4f} | {lv.positives:,} | {lv.oracle:.5f} | "
                         + " | ".join(paired.mean_text(lv.aucs.get(m, [])) for m in models) + " |")
        lines += ["", "| w | " + " | ".join(f"{s} − {b}" for s in subjects for b in BARS)
                  + " | " + " | ".join(f"{s} best epoch" for s in subjects) + " |",
                  "|---:|" + "---:|" * (len(subjects) * len(BARS) + len(subjects))]
        for lv in rows:
            epochs = [", ".join(str(e) for e in lv.best_epochs.get(s, [])) or "—" for s in subjects]
            lines.append(f"| {lv.shared_weight:.2f} | " + " | ".join(paired.diff_text(lv.diffs, s, b) for s in subjects for b in BARS)
                         + " | " + " | ".join(epochs) + " |")
        lines.append("")
    md = out_dir / "relatedness.md"
    md.write_text("\n".join(lines) + "\n")

    csv_path = out_dir / "relatedness.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["shared_weight", "task", "model", "against", "value", "ci_low",
                                                "ci_high", "seed_std", "seeds"])
        writer.writeheader()
        for lv in levels:
            writer.writerow({"shared_weight": lv.shared_weight, "task": lv.task, "model": "oracle", "against": "",
                             "value": f"{lv.oracle:.6f}", "seeds": ""})
            for m, values in lv.aucs.items():
                writer.writerow({"shared_weight": lv.shared_weight, "task": lv.task, "model": m, "against": "",
                                 "value": f"{np.mean(values):.6f}", "seed_std": f"{np.std(values, ddof=1):.6f}"
                                 if len(values) > 1 else "", "seeds": len(values)})
            for d in lv.diffs:
                writer.writerow({"shared_weight": lv.shared_weight, "task": lv.task, "model": d.subject,
                                 "against": d.against, "value": f"{d.diff:.6f}", "ci_low": f"{d.low:.6f}",
                                 "ci_high": f"{d.high:.6f}", "seed_std": f"{d.seed_std:.6f}", "seeds": len(rc.seeds)})
    return [md, csv_path, plot(levels, subjects, tasks, out_dir / "relatedness.png")]


def plot(levels: list[Level], subjects: list[str], tasks: list[str], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.6 * len(tasks), 7.6), squeeze=False, sharex=True)
    colors = {EMM_LABEL: "#d9480f", "best donor": "#868e96", "donor ensemble": "#495057", "donor stack": "#212529",
              "LightGBM": "#2b8a3e"}
    palette = iter(["#4c6ef5", "#ae3ec9", "#1098ad"])
    for s in subjects:
        colors.setdefault(s, next(palette, "#1c7ed6"))
    for col, task in enumerate(tasks):
        rows = sorted((lv for lv in levels if lv.task == task), key=lambda lv: lv.shared_weight)
        w = np.array([lv.shared_weight for lv in rows])
        top, bottom = axes[0][col], axes[1][col]
        top.plot(w, [lv.oracle for lv in rows], "k--", label="oracle (ceiling)")
        for m in [*subjects, *BARS]:
            have = [(lv.shared_weight, np.mean(lv.aucs[m])) for lv in rows if lv.aucs.get(m)]
            if have:
                top.plot(*zip(*have), marker="o", color=colors[m], label=m)
        top.set_title(f"{task}: test AUC")
        top.legend(fontsize=7)
        bottom.axhline(0, color="k", lw=0.8)
        offsets = np.linspace(-0.012, 0.012, len(subjects) * len(PLOTTED_DIFFS))
        k = 0
        for s in subjects:
            for b, style in zip(PLOTTED_DIFFS, ("-", ":")):
                ds = [(lv.shared_weight, d) for lv in rows for d in lv.diffs if d.subject == s and d.against == b]
                if ds:
                    x = np.array([x for x, _ in ds]) + offsets[k]
                    y = np.array([d.diff for _, d in ds])
                    err = np.array([[d.diff - d.low for _, d in ds], [d.high - d.diff for _, d in ds]])
                    bottom.errorbar(x, y, yerr=err, marker="o", ls=style, color=colors[s], capsize=3,
                                    label=f"{s} − {b}")
                k += 1
        bottom.set_title(f"{task}: paired AUC difference, 95% CI")
        bottom.set_xlabel("planted relatedness (synth.shared_weight)")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
