"""Stage 5, ``evaluate``: score the saved fused model on the test split and compare it with its pool.

Gain is the paper's: the fused model's test AUC minus the mean test AUC of that task's single-task
models (also given relative, in %). We also report the gap to the *best* donor, a stricter bar.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.fusion.saved import load_fused
from emm.io import atomic_dir, write_json
from emm.models.pool import read_pool
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import TrackingConfig, load_params
from emm.pipeline.register import register_fused
from emm.train.metrics import mean_auc, task_metrics
from emm.train.trainer import predict_proba

log = logging.getLogger(__name__)


def compare_with_pool(test: dict[str, dict[str, float]], pool_dir: Path) -> dict[str, dict[str, Any]]:
    entries = read_pool(pool_dir)
    out = {}
    for task, m in test.items():
        donors = {e.name: e.test_auc for e in entries if e.task == task}
        mean, best = float(np.mean(list(donors.values()))), max(donors.values())
        out[task] = {"auc": m["auc"], "logloss": m["logloss"], "pool": donors, "pool_mean_auc": mean,
                     "pool_best_auc": best, "gain": m["auc"] - mean, "gain_pct": 100 * (m["auc"] - mean) / mean,
                     "vs_best_donor": m["auc"] - best}
    return out


def plot_auc(per_task: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib  # local: the headless backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_task), figsize=(4.5 * len(per_task), 3.6), squeeze=False)
    for ax, (task, row) in zip(axes[0], per_task.items()):
        names = [*row["pool"], "EMM (fused)"]
        values = [*row["pool"].values(), row["auc"]]
        colors = ["#9aa5b1"] * len(row["pool"]) + ["#d9480f"]
        ax.barh(names, values, color=colors)
        lo = min(values)
        ax.set_xlim(lo - (max(values) - lo) * 1.5 - 1e-3, max(values) + (max(values) - lo) * 0.5 + 1e-4)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.4f}", va="center", fontsize=8)
        ax.set_title(f"{task}: test AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(dataset: str, data_dir: Path, pool_dir: Path, fused_dir: Path, out_dir: Path, *,
             tracking: TrackingConfig | None = None) -> dict[str, Any]:
    """Score the saved fused model on the test split and write ``eval/`` (metrics.json, auc.json, plot);
    with ``tracking``, also register it (``emm.pipeline.register``) and record the version in metrics.json.

    Why registration happens inside the atomic folder: ``eval/metrics.json`` must never describe a
    registration that did not happen. A stage killed or failing while registering leaves the previous
    ``eval/`` (or none), never a new one without its version.
    """
    schema = Schema.load(data_dir)
    model, meta = load_fused(fused_dir, schema)
    test = load_split(data_dir, "test", schema)
    metrics = task_metrics(test.labels.numpy(), predict_proba(model, test), schema.task_names)
    per_task = compare_with_pool(metrics, pool_dir)
    summary = {"dataset": dataset, "rows_test": len(test), "mean_test_auc": mean_auc(metrics), "tasks": per_task,
               "mlflow_run_id": meta.get("mlflow_run_id")}
    with atomic_dir(out_dir) as tmp:
        (tmp / "plots").mkdir()
        write_json(tmp / "metrics.json", summary)
        write_json(tmp / "auc.json", [{"model": name, "task": t, "auc": auc}
                                      for t, row in per_task.items()
                                      for name, auc in [*row["pool"].items(), ("emm", row["auc"])]])
        plot_auc(per_task, tmp / "plots" / "auc.png")
        if tracking is not None:
            summary["registered_version"] = register_fused(dataset, data_dir, fused_dir, tmp, summary, tracking)
            write_json(tmp / "metrics.json", summary)
    return summary


def evaluate_stage(dataset: str, params: Path | str | None = None, *, register: bool = True) -> dict[str, Any]:
    """Evaluate, then (unless ``register`` is off) register the fused model as ``emm-<dataset>`` @challenger;
    the registered version is recorded in ``eval/metrics.json``."""
    cfg = load_params(params)
    dirs = [stage_dir(cfg, dataset, s) for s in ("data", "pool", "fused", "eval")]
    return evaluate(dataset, *dirs, tracking=cfg.tracking if register else None)
