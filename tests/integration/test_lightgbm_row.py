"""The LightGBM-per-task row on real Census rows: one model per task, early stopping on val."""

from __future__ import annotations

from emm.train.lightgbm_row import lightgbm_per_task


def test_lightgbm_row_scores_every_task(census_small_data):
    result = lightgbm_per_task(census_small_data, rounds=200, early_stop=20)
    assert set(result) == {"income", "marital"}
    assert result["marital"]["test_auc"] > 0.95 and result["income"]["test_auc"] > 0.85
    assert all(0 < r["best_iteration"] <= 200 for r in result.values())
