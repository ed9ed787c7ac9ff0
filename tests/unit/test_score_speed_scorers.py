"""The scorers harness/benchmarks/score_speed.py races: the tuned onnxruntime session and its batched scoring, the
lleaves-compiled LightGBM boosters (they must score exactly what LightGBM scores, at the same best iteration, or
the race compares different models), and the loading of the compress stage's compact model."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.io import write_json
from emm.pipeline.compress import COMPACT_JSON, COMPACT_WEIGHTS
from emm.train.compact import CompactSpec, build_compact
from emm.train.predict import predict_proba
from emm.weights import save_module
from harness.benchmarks.score_speed import (TUNED_CONFIG, compile_booster, load_compact, onnx_logits, tuned_session,
                                            tuned_session_options)
from tests.unit.test_akf import batch, make_schema


def test_the_tuned_options_say_what_the_docstring_promises() -> None:
    import onnxruntime as ort

    options = tuned_session_options(3)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert TUNED_CONFIG["session.set_denormal_as_zero"] == "1"
    assert all(options.get_session_config_entry(k) == v for k, v in TUNED_CONFIG.items())


def test_a_tuned_session_scores_every_row_once_across_batches(tmp_path: Path) -> None:
    """A graph in EMM's export signature (logits = dense * 2, sparse unused but declared): batches of 4 over 10
    rows give every row's logits, in order, the last short batch included."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["dense", "two"], ["logits"])], "g",
        [helper.make_tensor_value_info("sparse", TensorProto.INT64, ["batch", 3]),
         helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    dense = np.arange(20, dtype=np.float32).reshape(10, 2)
    got = onnx_logits(tuned_session(path, 1), np.zeros((10, 3), np.int64), dense, batch_size=4)
    np.testing.assert_array_equal(got, dense * 2)


def test_lleaves_scores_what_lightgbm_scores_at_its_best_iteration(tmp_path: Path) -> None:
    """A categorical column (as EMM's LightGBM row gives the sparse features), a dense one with NaN, a category the
    training never saw; early stopping ends before the last round, so scoring every tree would differ."""
    rng = np.random.default_rng(0)
    n = 600
    cat, num = rng.integers(0, 6, n).astype(np.float64), rng.normal(size=n)
    num[rng.random(n) < 0.1] = np.nan
    y = ((cat % 2 == 0) ^ (np.nan_to_num(num) > 0.3) ^ (rng.random(n) < 0.15)).astype(float)
    x = np.column_stack([cat, num])
    params = {"objective": "binary", "num_leaves": 7, "min_data_in_leaf": 5, "learning_rate": 0.3, "verbose": -1,
              "num_threads": 1, "seed": 1, "metric": "auc"}
    train = lgb.Dataset(x[:400], y[:400], categorical_feature=[0], free_raw_data=False)
    val = lgb.Dataset(x[400:], y[400:], reference=train, categorical_feature=[0])
    booster = lgb.train(params, train, num_boost_round=200, valid_sets=[val],
                        callbacks=[lgb.early_stopping(5, verbose=False)], keep_training_booster=True)
    assert 0 < booster.best_iteration < booster.num_trees()  # the best iteration is not the last
    probe = np.vstack([x, [[9.0, 0.5], [np.nan, np.nan]]])  # an unseen category, a row all missing
    compiled = compile_booster(booster, tmp_path / "booster.txt")
    expected = booster.predict(probe, num_iteration=booster.best_iteration)
    np.testing.assert_allclose(compiled.predict(probe, n_jobs=2), expected, rtol=0, atol=1e-6)
    assert np.abs(booster.predict(probe, num_iteration=0) - expected).max() > 1e-6  # all trees score otherwise


def test_load_compact_says_why_there_is_none(tmp_path: Path) -> None:
    schema = make_schema(["a", "b"])
    with pytest.raises(EMMError, match="emm compress"):
        load_compact(tmp_path / "compact", schema)
    write_json(tmp_path / COMPACT_JSON, {"enabled": False, "note": "compress.enabled is false"})
    with pytest.raises(EMMError, match="compress.enabled is false"):
        load_compact(tmp_path, schema)


def test_load_compact_rebuilds_the_saved_model(tmp_path: Path) -> None:
    schema = make_schema(["a", "b"])
    spec = CompactSpec(bottom=[16, 8], tower=[4], embed_dim=4, numeric={"mode": "minmax"})
    torch.manual_seed(3)
    saved = build_compact(spec, schema).eval()
    save_module(saved, tmp_path / COMPACT_WEIGHTS)
    write_json(tmp_path / COMPACT_JSON, {"spec": spec.model_dump(mode="json"),
                                         "schema_fingerprint": schema.fingerprint()})
    model, onnx_path = load_compact(tmp_path, schema)
    sparse, dense = batch(32)
    rows = SplitTensors(sparse, dense, torch.zeros(32, 2), ["a", "b"])
    assert onnx_path is None  # no compact.onnx beside it: the benchmark exports one
    np.testing.assert_array_equal(predict_proba(model, rows), predict_proba(saved, rows))
