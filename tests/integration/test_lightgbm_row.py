"""The LightGBM-per-task row on real Census rows: one model per task, early stopping on val."""

from __future__ import annotations

from emm.train.lightgbm_row import lightgbm_per_task


def test_lightgbm_row_scores_every_task(census_small_data):
    result = lightgbm_per_task(census_small_data, rounds=200, early_stop=20)
    assert set(result) == {"income", "marital"}
    assert result["marital"]["test_auc"] > 0.95 and result["income"]["test_auc"] > 0.85
    assert all(0 < r["best_iteration"] <= 200 for r in result.values())


def test_lightgbm_row_returns_the_test_scores_its_auc_was_computed_on_and_the_booster_behind_them(census_small_data):
    import numpy as np
    import pyarrow.parquet as pq

    from emm.data.schema import Schema
    from emm.train.lightgbm_row import lightgbm_features
    from emm.train.metrics import auc

    result = lightgbm_per_task(census_small_data, rounds=50, early_stop=10)
    test = pq.read_table(census_small_data / "test.parquet").to_pandas()
    labels = test["income"].to_numpy()
    scores = result["income"]["test_scores"]
    assert scores.shape == labels.shape and auc(labels, scores) == result["income"]["test_auc"]
    booster = result["income"]["booster"]
    features = lightgbm_features(Schema.load(census_small_data))[1]
    np.testing.assert_array_equal(booster.predict(test[features], num_iteration=booster.best_iteration), scores)
