"""AUC and logloss per task (scikit-learn), the numbers every table in EMM reports.

Scores are checked finite first: a model returning NaN on some rows (broken weights, an outside model that
overflows on rows its import checks did not see) is refused with the model and the row count named,
rather than left to scikit-learn's "Input contains NaN" traceback. Every row is checked, labelled or not:
a model that breaks on some rows is broken whichever of them happen to carry a label.

A NaN label is a missing one (the row has no label for that task): each metric is taken on the task's
labelled rows only, and says how many there were (``labelled``). With no labelled row the logloss is
NaN; with fewer than two classes among them the AUC is NaN (undefined, not 0.5), as it is for a split
of one class.
"""

from __future__ import annotations

import math

import numpy as np

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


def _labelled(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (labels, scores) of the rows whose label is not NaN (a missing label)."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    if y_true.dtype.kind != "f":  # integer/bool labels cannot be missing
        return y_true, y_score
    keep = ~np.isnan(y_true)
    return y_true[keep], y_score[keep]


def auc(y_true: np.ndarray, y_score: np.ndarray, *, what: str = "the model", task: str | None = None) -> float:
    """ROC AUC on the labelled rows (NaN labels left out); NaN when they hold fewer than two classes (AUC
    is undefined there, not 0.5). ``what`` and ``task`` name the scores in the error ``check_scores`` raises."""
    y_score = check_scores(y_score, what=what, task=task)
    y_true, y_score = _labelled(y_true, y_score)
    if len(y_true) == 0 or y_true.min() == y_true.max():
        return math.nan
    from sklearn.metrics import roc_auc_score  # here: scikit-learn loads slowly, and scoring never needs it

    return float(roc_auc_score(y_true, y_score))


def logloss(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Log loss on the labelled rows (NaN labels left out); NaN when there is none."""
    y_true, y_prob = _labelled(y_true, y_prob)
    if len(y_true) == 0:
        return math.nan
    from sklearn.metrics import log_loss

    return float(log_loss(y_true, np.clip(np.asarray(y_prob, dtype=np.float64), 1e-7, 1 - 1e-7), labels=[0, 1]))


def task_metrics(labels: np.ndarray, probs: np.ndarray, task_names: list[str], *,
                 what: str = "the model") -> dict[str, dict[str, float]]:
    """{task: {"auc": .., "logloss": .., "labelled": rows}} for [N, T] labels (NaN: missing) and
    probabilities of the model ``what`` names; each task on its labelled rows."""
    labels = np.asarray(labels)
    out = {}
    for i, name in enumerate(task_names):
        y = labels[:, i]
        labelled = int(len(y) - np.isnan(y).sum()) if y.dtype.kind == "f" else len(y)
        out[name] = {"auc": auc(y, probs[:, i], what=what, task=name), "logloss": logloss(y, probs[:, i]),
                     "labelled": labelled}
    return out


def mean_auc(metrics: dict[str, dict[str, float]]) -> float:
    values = [m["auc"] for m in metrics.values() if not math.isnan(m["auc"])]
    return float(np.mean(values)) if values else math.nan
