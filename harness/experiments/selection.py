"""Which task does each task select? The fusion gates' picks of EMM's runs, per level: heat maps and a table.

Why apart from the tables: the picks are read from the gate reports the fused runs stored, not from AUCs,
and answer a question of their own (the paper's "most related task"), not a row of Table I or II.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from harness.experiments.plotting import pyplot


def selection_matrices(results: list[dict[str, Any]], task_set: str, tasks: list[str]) -> dict[int, np.ndarray]:
    """level -> [T, T] mean over seeds of the fraction of test rows in which task (row) selected task (col)."""
    per_level: dict[int, list[np.ndarray]] = defaultdict(list)
    for r in results:
        if r["task_set"] != task_set or r["kind"] != "fused" or r["method"] != "full":
            continue
        for level in r.get("gates", []):
            m = np.zeros((len(tasks), len(tasks)))
            for i, t in enumerate(tasks):
                for u, frac in (level["tasks"][t].get("selection") or {}).items():
                    m[i, tasks.index(u)] = frac
            per_level[int(level["level"])].append(m)
    return {k: np.mean(v, axis=0) for k, v in sorted(per_level.items())}


def write_selection(task_sets: dict[str, list[str]], results: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Heat maps (rows: the selecting task, columns: the task it picks, per level) and the same as a table."""
    plt = pyplot()
    panels = [(ts, tasks, selection_matrices(results, ts, tasks)) for ts, tasks in task_sets.items()]
    panels = [p for p in panels if p[2]]
    if not panels:
        return []
    width = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(len(panels), width, figsize=(3.2 * width, 3.0 * len(panels)), squeeze=False)
    lines = ["# Which task does each task select? (fusion gate, test rows, mean over seeds)", ""]
    for i, (ts, tasks, mats) in enumerate(panels):
        lines += [f"## {', '.join(tasks)}", "", "| level | " + " | ".join(f"{t} picks" for t in tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for j in range(width):
            ax = axes[i][j]
            if j >= len(mats):
                ax.axis("off")
                continue
            level, m = list(mats.items())[j]
            ax.imshow(m, vmin=0, vmax=1, cmap="Oranges")
            ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
            for a in range(len(tasks)):
                for b in range(len(tasks)):
                    if a != b:
                        ax.text(b, a, f"{m[a, b]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if m[a, b] > 0.6 else "black")
            ax.set_title(f"{len(tasks)} tasks, level {level}", fontsize=9)
        for level, m in mats.items():
            picks = [f"{tasks[int(np.argmax(m[a]))]} ({m[a].max():.2f})" for a in range(len(tasks))]
            lines.append(f"| {level} | " + " | ".join(picks) + " |")
        lines.append("")
    fig.tight_layout()
    png = out_dir / "selection.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    md = out_dir / "selection.md"
    md.write_text("\n".join(lines + ["![selection](selection.png)"]) + "\n")
    return [md, png]
