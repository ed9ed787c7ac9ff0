"""AUC and logloss per task (scikit-learn), the numbers every table in EMM reports."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC; NaN when a split has only one class (AUC is undefined there, not 0.5)."""
    y_true = np.asarray(y_true)
    if y_true.min() == y_true.max():
        return math.nan
    return float(roc_auc_score(y_true, y_score))


def logloss(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    return float(log_loss(np.asarray(y_true), np.clip(np.asarray(y_prob, dtype=np.float64), 1e-7, 1 - 1e-7),
                          labels=[0, 1]))


def task_metrics(labels: np.ndarray, probs: np.ndarray, task_names: list[str]) -> dict[str, dict[str, float]]:
    """{task: {"auc": .., "logloss": ..}} for [N, T] labels and probabilities."""
    return {name: {"auc": auc(labels[:, i], probs[:, i]), "logloss": logloss(labels[:, i], probs[:, i])}
            for i, name in enumerate(task_names)}


def mean_auc(metrics: dict[str, dict[str, float]]) -> float:
    values = [m["auc"] for m in metrics.values() if not math.isnan(m["auc"])]
    return float(np.mean(values)) if values else math.nan
