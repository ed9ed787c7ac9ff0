"""The LightGBM-per-task row on real Census rows: one model per task, early stopping on val."""

from __future__ import annotations

from emm.train.lightgbm_row import lightgbm_per_task


def test_lightgbm_row_scores_every_task(census_small_data):
    result = lightgbm_per_task(census_small_data, rounds=200, early_stop=20)
    assert set(result) == {"income", "marital"}
    assert result["marital"]["test_auc"] > 0.95 and result["income"]["test_auc"] > 0.85
    assert all(0 < r["best_iteration"] <= 200 for r in result.values())


def test_lightgbm_row_returns_the_test_scores_its_auc_was_computed_on(census_small_data):
    import pyarrow.parquet as pq

    from emm.train.metrics import auc

    result = lightgbm_per_task(census_small_data, rounds=50, early_stop=10)
    labels = pq.read_table(census_small_data / "test.parquet", columns=["income"]).column(0).to_numpy()
    scores = result["income"]["test_scores"]
    assert scores.shape == labels.shape and auc(labels, scores) == result["income"]["test_auc"]
