"""What a practitioner would pick instead: one LightGBM model per task on the same splits.

Sparse features are given to LightGBM as categorical (their ingested indices), dense ones as numbers;
quantile-bucket features (``dense_buckets``) are left out: a tree bins the dense column itself, and the
row stays comparable with runs on data ingested without buckets. Early stopping watches the validation AUC. This is the bar the fused model must clear.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from emm.data.schema import Schema
from emm.errors import EMMError
from emm.train.metrics import auc

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary", "learning_rate": 0.05, "num_leaves": 63, "min_data_in_leaf": 50,
    "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "verbose": -1, "num_threads": 2,
}


def lightgbm_features(schema: Schema) -> tuple[list[str], list[str]]:
    """(categorical columns, all feature columns in the order LightGBM is given them) of an ingested frame."""
    categorical = [f.name for f in schema.sparse if f.bucket_of is None]
    return categorical, categorical + [f.name for f in schema.dense]


def lightgbm_per_task(data_dir: Path, *, seed: int = 2026, rounds: int = 2000, early_stop: int = 50,
                      params: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{task: {"val_auc", "test_auc", "best_iteration", "seconds", "test_scores", "val_scores", "booster"}} for
    every task of the ingested data, in the schema's task order (the per-row probabilities: paired comparisons
    on the same test rows, and stacks fitted on validation rows; the booster: scoring other rows, given the
    columns ``lightgbm_features`` names)."""
    try:
        import lightgbm as lgb
    except ImportError as exc:  # an optional extra
        raise EMMError("the LightGBM row needs the `lightgbm` package: pip install -e '.[baselines]'") from exc
    schema = Schema.load(data_dir)
    categorical, features = lightgbm_features(schema)
    frames = {s: pq.read_table(Path(data_dir) / f"{s}.parquet").to_pandas() for s in ("train", "val", "test")}
    out = {}
    for task in schema.task_names:
        started = time.perf_counter()
        train = lgb.Dataset(frames["train"][features], frames["train"][task], categorical_feature=categorical,
                            free_raw_data=False)
        val = lgb.Dataset(frames["val"][features], frames["val"][task], reference=train,
                          categorical_feature=categorical)
        booster = lgb.train({**DEFAULT_PARAMS, **(params or {}), "seed": seed, "metric": "auc"}, train,
                            num_boost_round=rounds, valid_sets=[val],
                            callbacks=[lgb.early_stopping(early_stop, verbose=False)])
        scores = {s: booster.predict(frames[s][features], num_iteration=booster.best_iteration) for s in ("val", "test")}
        out[task] = {"val_auc": auc(frames["val"][task].to_numpy(), scores["val"]),
                     "test_auc": auc(frames["test"][task].to_numpy(), scores["test"]),
                     "best_iteration": int(booster.best_iteration), "seconds": time.perf_counter() - started,
                     "test_scores": scores["test"], "val_scores": scores["val"], "booster": booster}
    return out
