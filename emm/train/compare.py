"""Is A really better than B? Paired bootstrap CIs of AUC differences, and the donor baselines a fused
model must clear (the mean of the donors' logits, and a logistic-regression stack of them).

Why paired: on one test set, two models' AUCs share most of their sampling noise (the same hard rows
are hard for both). The unpaired standard error of one AUC is several times larger than the
uncertainty of the *difference* measured on the same rows, so "A beats B" is judged by resampling test
rows jointly for both models and reading the percentile interval of AUC(A) − AUC(B).

Why a hand-written AUC inside the bootstrap: ``sklearn.metrics.roc_auc_score`` sorts every resample,
and 1000 resamples of 50k rows, several comparisons, must take seconds on two cores. A bootstrap
resample is equivalent to integer weights (how often each row was drawn), and the AUC of weighted rows
only needs, per distinct score, the weight of positives and of negatives there. Those sums are one
sparse matrix product per score array (the sort is done once, up front); ties get half credit exactly
as in the Mann-Whitney statistic, so the result equals ``roc_auc_score`` on the resampled rows.

Why labels are checked for 0/1 (``binary_labels``): a missing label is NaN in EMM's tensors, and
``astype(bool)`` makes NaN a positive, so an unsliced task would be scored, resampled or stacked on
invented positives without a word. Every public function here that takes labels refuses them; the caller
slices each task to its labelled rows first (its scores on the same rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from emm.errors import EMMError

if TYPE_CHECKING:  # imported where used: SciPy and scikit-learn load slowly, and scoring never needs them
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression


Pair = tuple[np.ndarray, np.ndarray]  # (score_a, score_b) on the same rows
SLICE_HINT = "slice to the task's labelled rows first (labels and scores alike)"


def binary_labels(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    """``labels`` as a bool array, or an EMMError when one is missing (NaN) or is not 0/1.

    ``what`` names the caller in the message (``"paired AUC CI"``, ``"donor stack"``)."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr
    try:
        values = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:  # pandas' <NA> in an object array, strings
        raise EMMError(f"{what}: the labels are not all numbers 0/1 (a missing label?); {SLICE_HINT}") from exc
    missing = int(np.isnan(values).sum())
    if missing:
        raise EMMError(f"{what}: {missing} of {values.size} labels are missing (NaN); {SLICE_HINT}")
    odd = ~np.isin(values, (0.0, 1.0))
    if odd.any():
        raise EMMError(f"{what}: labels must be 0/1, got {np.unique(values[odd])[:5].tolist()} "
                       f"({int(odd.sum())} of {values.size}); pass a task's binary labels")
    return values.astype(bool)


@dataclass(frozen=True)
class WeightedAUC:
    """One score array prepared for AUCs under row weights (bootstrap counts).

    ``groups`` maps rows to 3K buckets, K = the number of distinct scores held by at least one
    positive: rows [0, K) sum positive weight per such score, [K, 2K) negative weight strictly between
    consecutive positive scores, [2K, 3K) negative weight tied with a positive score. Negatives above
    the highest positive score never count and belong to no bucket.
    """

    groups: sp.csr_matrix
    k: int

    @classmethod
    def prepare(cls, labels: np.ndarray, score: np.ndarray) -> "WeightedAUC":
        """``labels`` 0/1 (no missing label: see ``binary_labels``), ``score`` of the same rows."""
        labels = binary_labels(labels, "weighted AUC")
        score = np.asarray(score, dtype=np.float64)
        if score.shape != labels.shape or score.ndim != 1:
            raise ValueError(f"score {score.shape} and labels {labels.shape} must be the same 1-D shape")
        if np.isnan(score).any():
            raise ValueError("score has NaN values; an AUC of them is undefined")
        _, code = np.unique(score, return_inverse=True)
        pos_codes = np.unique(code[labels])
        k = len(pos_codes)
        bucket = np.empty(len(score), dtype=np.int64)
        bucket[labels] = np.searchsorted(pos_codes, code[labels])
        neg = ~labels
        below = np.searchsorted(pos_codes, code[neg])          # positive scores strictly below each negative
        tied = (below < k) & (pos_codes[np.minimum(below, k - 1)] == code[neg]) if k else np.zeros_like(below, bool)
        bucket[neg] = np.where(tied, 2 * k + below, np.where(below < k, k + below, 3 * k))
        keep = bucket < 3 * k                                  # drops negatives above every positive
        rows = np.flatnonzero(keep)
        import scipy.sparse as sp

        groups = sp.csr_matrix((np.ones(len(rows), np.int32), (bucket[keep], rows)), shape=(3 * k, len(score)))
        return cls(groups, k)

    def auc(self, counts_t: np.ndarray, totals: np.ndarray | None = None) -> np.ndarray:
        """AUC per column of ``counts_t`` ([n_rows, B] integer weights; all ones = the plain AUC);
        ``totals``: the column sums, when the caller already has them (shared by every score array)."""
        if self.k == 0:
            return np.full(counts_t.shape[1], math.nan)
        sums = (self.groups @ counts_t).astype(np.float64)     # [3K, B]
        pos, gap, tie = sums[:self.k], sums[self.k:2 * self.k], sums[2 * self.k:]
        neg_below = np.cumsum(gap, axis=0) + np.cumsum(tie, axis=0) - 0.5 * tie
        n_pos = pos.sum(axis=0)
        n_neg = (counts_t.sum(axis=0, dtype=np.float64) if totals is None else totals) - n_pos
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample without one class: NaN
            return np.einsum("kb,kb->b", pos, neg_below) / (n_pos * n_neg)


def weighted_auc(labels: np.ndarray, score: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUC of ``score`` with rows weighted by ``weights`` ([n] or [B, n] integer counts; default: one
    each), one value per row of weights. Equals ``roc_auc_score`` on the rows repeated that often."""
    w = np.ones((1, len(score)), np.int32) if weights is None else np.atleast_2d(weights).astype(np.int32)
    return WeightedAUC.prepare(labels, score).auc(np.ascontiguousarray(w.T))


def _counts(rows: np.ndarray, n: int) -> np.ndarray:
    """Bootstrap row indices [B, n] -> how often each row was drawn, transposed to [n, B] (the layout
    the sparse products read row by row). One bincount over offsets keeps each resample's counts in
    its own cache-sized block."""
    rows = np.atleast_2d(rows)
    b = rows.shape[0]
    flat = (rows + (np.arange(b, dtype=rows.dtype) * n)[:, None]).ravel()
    return np.ascontiguousarray(np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.int32).T)


def paired_auc_cis(labels: np.ndarray, comparisons: Mapping[str, Sequence[Pair]], *, n_resamples: int = 1000,
                   confidence: float = 0.95, seed: int = 0, batch: int = 50) -> dict[str, dict[str, float]]:
    """Paired bootstrap CIs for several AUC differences, all from one set of row resamples.

    ``comparisons`` maps a name to pairs ``(score_a, score_b)``; its statistic is the mean over its
    pairs of AUC(a) − AUC(b) (one pair: the plain difference; one pair per seed, all scored on the same
    test rows: the seed-mean difference). Each distinct array (by identity) is prepared once.

    ``scipy.stats.bootstrap(paired=True)`` resamples the row indices, so every score and the labels are
    drawn on the same rows; ``batch`` resamples at a time bound the memory (~5 arrays of batch x n).
    The interval is the percentile one: BCa would add a jackknife, n more evaluations of the statistic,
    which at 50k rows costs far more than the bootstrap itself.

    Returns ``{name: {diff, low, high, n_resamples, confidence, auc_a, auc_b}}`` where ``diff`` is the
    statistic on the full test set and ``auc_a``/``auc_b`` the mean AUCs it is the difference of.
    ``labels`` are 0/1 with none missing (an EMMError otherwise): slice a task to its labelled rows first.
    """
    labels = binary_labels(labels, "paired AUC CI").ravel()
    n = len(labels)
    if labels.all() or not labels.any():
        raise ValueError("paired AUC CI: the labels hold one class only, so no AUC is defined")
    prepared: dict[int, WeightedAUC] = {}
    keep_alive = []  # ids are only unique while the arrays live
    plan: dict[str, list[tuple[int, int]]] = {}
    for name, pairs in comparisons.items():
        if not pairs:
            raise ValueError(f"comparison {name!r} has no score pairs")
        plan[name] = []
        for a, b in pairs:
            for arr in (a, b):
                if id(arr) not in prepared:
                    if len(arr) != n:
                        raise ValueError(f"comparison {name!r}: {len(arr)} scores for {n} labels")
                    prepared[id(arr)] = WeightedAUC.prepare(labels, np.asarray(arr).ravel())
                    keep_alive.append(arr)
            plan[name].append((id(a), id(b)))
    order = list(prepared)

    def aucs(counts_t: np.ndarray) -> dict[int, np.ndarray]:
        totals = np.full(counts_t.shape[1], float(n))  # a bootstrap resample has n rows
        return {key: prepared[key].auc(counts_t, totals) for key in order}

    def summarise(auc_of: dict[int, np.ndarray]) -> np.ndarray:  # [names, B] mean differences
        return np.stack([np.mean([auc_of[a] - auc_of[b] for a, b in plan[name]], axis=0) for name in plan])

    def statistic(rows: np.ndarray, axis: int = -1) -> np.ndarray:
        return summarise(aucs(_counts(rows, n)))

    from scipy.stats import bootstrap

    full = aucs(np.ones((n, 1), np.int32))
    point = summarise(full)[:, 0]
    res = bootstrap((np.arange(n),), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                    batch=batch, confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
    out = {}
    for i, name in enumerate(plan):
        out[name] = {"diff": float(point[i]), "low": float(low[i]), "high": float(high[i]),
                     "n_resamples": int(n_resamples), "confidence": float(confidence),
                     "auc_a": float(np.mean([full[a][0] for a, _ in plan[name]])),
                     "auc_b": float(np.mean([full[b][0] for _, b in plan[name]]))}
    return out


def paired_auc_ci(labels: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, *, n_resamples: int = 1000,
                  confidence: float = 0.95, seed: int = 0, batch: int = 50) -> dict[str, float]:
    """AUC(a) − AUC(b) on the same rows with a paired percentile bootstrap CI over the test rows
    (see ``paired_auc_cis``; several comparisons on one test set are cheaper done there at once)."""
    return paired_auc_cis(labels, {"a-b": [(score_a, score_b)]}, n_resamples=n_resamples, confidence=confidence,
                          seed=seed, batch=batch)["a-b"]


# ---- the donor baselines ------------------------------------------------------------------------------------
def ensemble_logits(donor_logits: np.ndarray) -> np.ndarray:
    """The mean of a task's donors' logits ([n, donors] -> [n]): the free ensemble any pool gives."""
    return np.asarray(donor_logits, dtype=np.float64).reshape(len(donor_logits), -1).mean(axis=1)


def fit_stack(val_logits: np.ndarray, val_labels: np.ndarray, *, C: float | None = None) -> LogisticRegression:
    """Logistic regression on the donors' *validation* logits: a learned weighting of the donors that
    never sees test rows. The default L2 strength (``C`` None: scikit-learn's 1.0) is negligible at thousands
    of validation rows; it only keeps collinear donors (they nearly always are) from getting huge opposite
    weights. A smaller ``C`` regularises harder: for many inputs on few labelled rows (a cross-task stack of
    a scarce task). ``val_labels`` are 0/1 with none missing: the task's labelled validation rows."""
    x = np.asarray(val_logits, dtype=np.float64).reshape(len(val_logits), -1)
    y = binary_labels(val_labels, "donor stack").astype(int).ravel()
    if len(y) != len(x):
        raise EMMError(f"donor stack: {len(x)} rows of logits for {len(y)} labels; give both for the same rows")
    if C is not None and not C > 0:
        raise EMMError(f"donor stack: C must be > 0 (the inverse L2 strength), got {C}")
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000, **({} if C is None else {"C": float(C)})).fit(x, y)


def stack(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, *,
          C: float | None = None) -> np.ndarray:
    """Test scores (the stack's logit) of ``fit_stack`` applied to the donors' test logits."""
    model = fit_stack(val_logits, val_labels, C=C)
    return model.decision_function(np.asarray(test_logits, dtype=np.float64).reshape(len(test_logits), -1))
