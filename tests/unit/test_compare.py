"""Paired AUC CIs and the donor baselines, on synthetic data where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from emm.train.compare import ensemble_logits, fit_stack, paired_auc_ci, paired_auc_cis, stack, weighted_auc


def scores(n: int, signal: float, seed: int = 0, rate: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rate
    return y, signal * y + rng.normal(size=n)


def test_identical_scores_give_zero_difference_and_a_zero_interval() -> None:
    y, s = scores(3000, 1.0)
    ci = paired_auc_ci(y, s, s.copy(), n_resamples=200)
    assert (ci["diff"], ci["low"], ci["high"]) == (0.0, 0.0, 0.0)
    assert ci["n_resamples"] == 200


def test_a_clearly_better_score_has_its_interval_above_zero() -> None:
    y, weak = scores(5000, 0.5, seed=1)
    strong = weak + 1.5 * y  # the same rows, more signal
    ci = paired_auc_ci(y, strong, weak)
    assert ci["diff"] == pytest.approx(roc_auc_score(y, strong) - roc_auc_score(y, weak), abs=1e-12)
    assert 0 < ci["low"] < ci["diff"] < ci["high"]
    flipped = paired_auc_ci(y, weak, strong)
    assert flipped["high"] < 0 and flipped["diff"] == pytest.approx(-ci["diff"], abs=1e-12)


def test_interval_shrinks_with_more_rows() -> None:
    def width(n: int) -> float:
        y, a = scores(n, 1.0, seed=2)
        b = a + np.random.default_rng(3).normal(scale=1.0, size=n)  # a noisier copy: AUC(a) > AUC(b)
        ci = paired_auc_ci(y, a, b, n_resamples=400)
        return ci["high"] - ci["low"]

    small, large = width(2000), width(32000)  # 16x the rows: about 4x narrower
    assert 2.5 * large < small < 6 * large, (small, large)


def test_pairing_removes_the_noise_both_scores_share() -> None:
    """Two nearly identical models: the CI of their difference is far narrower than that of one AUC
    (AUC(a) − AUC(constant) is the bootstrap of AUC(a) alone). Resampling a and b independently would
    make it wider instead."""
    y, a = scores(4000, 1.0, seed=4)
    near = a + np.random.default_rng(5).normal(scale=0.05, size=len(a))
    single = paired_auc_ci(y, a, np.zeros_like(a), n_resamples=300)
    paired = paired_auc_ci(y, a, near, n_resamples=300)
    assert single["diff"] == pytest.approx(roc_auc_score(y, a) - 0.5)
    assert paired["high"] - paired["low"] < 0.2 * (single["high"] - single["low"])


@pytest.mark.parametrize("decimals", [None, 1, 0])  # continuous, many ties, few distinct values
def test_weighted_auc_equals_sklearn_on_the_resampled_rows(decimals: int | None) -> None:
    rng = np.random.default_rng(6)
    y, s = scores(700, 0.8, seed=7, rate=0.3)
    if decimals is not None:
        s = np.round(s, decimals)
        assert len(np.unique(s)) < len(s) / 5  # real ties, across both classes
    assert weighted_auc(y, s)[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    rows = rng.integers(0, len(y), size=(6, len(y)))
    counts = np.stack([np.bincount(r, minlength=len(y)) for r in rows])
    expected = [roc_auc_score(y[r], s[r]) for r in rows]
    np.testing.assert_allclose(weighted_auc(y, s, counts), expected, rtol=0, atol=1e-12)


def test_weighted_auc_of_a_sample_with_one_class_is_nan_and_labels_of_one_class_are_refused() -> None:
    y = np.array([0, 0, 1, 1])
    assert np.isnan(weighted_auc(y, np.arange(4.0), np.array([[2, 2, 0, 0]]))[0])
    with pytest.raises(ValueError, match="one class"):
        paired_auc_ci(np.zeros(10), np.arange(10.0), np.arange(10.0))


def test_several_comparisons_share_one_set_of_resamples() -> None:
    y, a = scores(3000, 1.0, seed=8)
    rng = np.random.default_rng(9)
    b, c = a + rng.normal(size=len(a)), a + 2 * rng.normal(size=len(a))
    both = paired_auc_cis(y, {"b": [(a, b)], "c": [(a, c)]}, n_resamples=300, seed=11)
    alone = paired_auc_ci(y, a, b, n_resamples=300, seed=11)
    assert both["b"] == alone  # the same seed draws the same rows, whatever else is compared
    assert both["c"]["low"] > both["b"]["low"]  # c is the noisier copy: a beats it by more
    pooled = paired_auc_cis(y, {"mean": [(a, b), (a, c)]}, n_resamples=300, seed=11)["mean"]
    assert pooled["diff"] == pytest.approx((both["b"]["diff"] + both["c"]["diff"]) / 2, abs=1e-12)
    assert pooled["auc_a"] == pytest.approx(roc_auc_score(y, a))
    assert pooled["auc_b"] == pytest.approx((roc_auc_score(y, b) + roc_auc_score(y, c)) / 2)


def test_ensemble_is_the_mean_logit() -> None:
    logits = np.array([[1.0, 3.0], [-2.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(ensemble_logits(logits), [2.0, -1.0, 0.5])


def test_stack_recovers_the_better_donor_when_the_other_is_noise() -> None:
    rng = np.random.default_rng(12)

    def donors(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.random(n) < 0.2
        good = 2.0 * y + rng.normal(size=n)
        noise = rng.normal(scale=3.0, size=n)
        return y, np.column_stack([noise, good])

    y_val, val = donors(4000)
    y_test, test = donors(4000)
    model = fit_stack(val, y_val)
    w_noise, w_good = model.coef_[0]
    assert w_good > 1.0 and abs(w_noise) < 0.1 * w_good
    stacked = roc_auc_score(y_test, stack(val, y_val, test))
    good, mean = roc_auc_score(y_test, test[:, 1]), roc_auc_score(y_test, ensemble_logits(test))
    assert stacked == pytest.approx(good, abs=0.003) and stacked > mean + 0.02
