"""What a practitioner would pick instead: one LightGBM model per task on the same splits.

Sparse features are given to LightGBM as categorical (their ingested indices), dense ones as numbers;
quantile-bucket features (``dense_buckets``) are left out: a tree bins the dense column itself, and the
row stays comparable with runs on data ingested without buckets. Early stopping watches the validation AUC. This is the bar the fused model must clear.

Missing labels (nulls in a task's column): each task's booster trains on the training rows labelled for
it and early-stops on its labelled validation rows; it then scores *every* val/test row (the per-row
scores line up with the split, like every other model's), and its AUCs are those of the labelled rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
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


def _labels(frame: pd.DataFrame, task: str) -> np.ndarray:
    """A task's column as float64, NaN where the row has no label (a null in the Parquet column)."""
    return frame[task].to_numpy(dtype=np.float64, na_value=np.nan)


def _labelled_rows(frame: pd.DataFrame, labels: np.ndarray, task: str, split: str, data_dir: Path) -> pd.DataFrame:
    """The rows of ``frame`` labelled for ``task`` (the frame itself when all are), or an EMMError if none is."""
    keep = ~np.isnan(labels)
    if not keep.any():
        raise EMMError(f"{Path(data_dir) / f'{split}.parquet'}: task {task!r} has no labelled row in split "
                       f"{split!r}, so its LightGBM model cannot be trained or early-stopped; raise the task's "
                       f"label fraction, ingest more rows, or leave the task out")
    return frame if keep.all() else frame[keep]


def lightgbm_per_task(data_dir: Path, *, seed: int = 2026, rounds: int = 2000, early_stop: int = 50,
                      params: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{task: {"val_auc", "test_auc", "best_iteration", "seconds", "test_scores", "val_scores", "booster",
    "labelled"}} for every task of the ingested data, in the schema's task order (the per-row probabilities of
    *every* row: paired comparisons on the same test rows, and stacks fitted on validation rows; the booster:
    scoring other rows, given the columns ``lightgbm_features`` names; ``labelled``: the rows per split that
    carry the task's label, those the booster trained/early-stopped on and the AUCs are taken on)."""
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
        labels = {s: _labels(frames[s], task) for s in frames}
        fit_rows = {s: _labelled_rows(frames[s], labels[s], task, s, data_dir) for s in ("train", "val")}
        train = lgb.Dataset(fit_rows["train"][features], fit_rows["train"][task], categorical_feature=categorical,
                            free_raw_data=False)
        val = lgb.Dataset(fit_rows["val"][features], fit_rows["val"][task], reference=train,
                          categorical_feature=categorical)
        booster = lgb.train({**DEFAULT_PARAMS, **(params or {}), "seed": seed, "metric": "auc"}, train,
                            num_boost_round=rounds, valid_sets=[val],
                            callbacks=[lgb.early_stopping(early_stop, verbose=False)])
        scores = {s: booster.predict(frames[s][features], num_iteration=booster.best_iteration) for s in ("val", "test")}
        out[task] = {"val_auc": auc(labels["val"], scores["val"]),  # both on the labelled rows only
                     "test_auc": auc(labels["test"], scores["test"]),
                     "labelled": {s: int((~np.isnan(y)).sum()) for s, y in labels.items()},
                     "best_iteration": int(booster.best_iteration), "seconds": time.perf_counter() - started,
                     "test_scores": scores["test"], "val_scores": scores["val"], "booster": booster}
    return out
