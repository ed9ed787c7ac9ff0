"""AUC and logloss per task (scikit-learn), the numbers every table in EMM reports.

Scores are checked finite first: a model returning NaN on some rows (broken weights, an outside model that
overflows on rows its import checks did not see) is refused with the model and the row count named,
rather than left to scikit-learn's "Input contains NaN" traceback.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from emm.errors import EMMError


def check_scores(y_score: np.ndarray, *, what: str = "the model", task: str | None = None) -> np.ndarray:
    """``y_score`` as an array, or an EMMError naming ``what`` and how many of its rows are NaN/inf."""
    y_score = np.asarray(y_score)
    bad = int(np.size(y_score) - np.isfinite(y_score).sum())
    if bad:
        for_task = f" for task {task!r}" if task is not None else ""
        raise EMMError(f"{what} gave {bad} non-finite score(s) (NaN/inf) of {len(y_score)} rows{for_task}, so it "
                       "cannot be scored (NaN weights, or an overflow, log or division out of range on those rows' "
                       "inputs); fix or retrain it")
    return y_score


def auc(y_true: np.ndarray, y_score: np.ndarray, *, what: str = "the model", task: str | None = None) -> float:
    """ROC AUC; NaN when a split has only one class (AUC is undefined there, not 0.5). ``what`` and ``task``
    name the scores in the error ``check_scores`` raises."""
    y_score = check_scores(y_score, what=what, task=task)
    y_true = np.asarray(y_true)
    if y_true.min() == y_true.max():
        return math.nan
    return float(roc_auc_score(y_true, y_score))


def logloss(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    return float(log_loss(np.asarray(y_true), np.clip(np.asarray(y_prob, dtype=np.float64), 1e-7, 1 - 1e-7),
                          labels=[0, 1]))


def task_metrics(labels: np.ndarray, probs: np.ndarray, task_names: list[str], *,
                 what: str = "the model") -> dict[str, dict[str, float]]:
    """{task: {"auc": .., "logloss": ..}} for [N, T] labels and probabilities of the model ``what`` names."""
    return {name: {"auc": auc(labels[:, i], probs[:, i], what=what, task=name),
                   "logloss": logloss(labels[:, i], probs[:, i])}
            for i, name in enumerate(task_names)}


def mean_auc(metrics: dict[str, dict[str, float]]) -> float:
    values = [m["auc"] for m in metrics.values() if not math.isnan(m["auc"])]
    return float(np.mean(values)) if values else math.nan
