"""A tree member scores with its own library where installed (``emm.models.tree_native``), and with the torch walk
wherever it must: tracing/export, the library absent, a module rebuilt from its layout alone. Both agree on
every row, NaNs included. Boosters here are trained on random rows of the fake schema (tests.unit.test_akf)."""

from __future__ import annotations

import copy
import pickle

import lightgbm as lgb
import numpy as np
import pytest
import torch
import xgboost as xgb

from emm.models.trees import TreeModel, load_tree
from tests.unit.test_akf import batch, make_schema

FEATURES = ["s0", "s1", "s2", "d0", "d1"]  # the fake schema's features, sparse then dense (local codes, floats)


def rows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    sparse, dense = batch(n, seed=seed)
    dense = dense.clone()
    dense[::5, 0] = float("nan")
    return sparse, dense


@pytest.fixture(scope="module")
def schema():
    return make_schema(["a", "b"])


@pytest.fixture(scope="module", params=["lightgbm", "xgboost"])
def tree(request, schema, tmp_path_factory) -> TreeModel:
    """A booster trained outside EMM on the booster matrix EMM feeds (``TreeModel.inputs``), saved natively."""
    fmt = request.param
    folder = tmp_path_factory.mktemp(f"native-{fmt}")
    sparse, dense = rows(2000, seed=3)
    offsets = torch.tensor([f.offset for f in schema.sparse])
    x = torch.cat([(sparse - offsets).double(), dense.double()], dim=1).numpy()
    y = ((x[:, 3] > 0.5) ^ (x[:, 1] % 2 == 0) | np.isnan(x[:, 3])).astype(int)
    if fmt == "lightgbm":
        path = folder / "m.txt"
        lgb.train({"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1, "seed": 1,
                   "min_data_per_group": 5, "cat_smooth": 1},
                  lgb.Dataset(x, y, feature_name=FEATURES, categorical_feature=FEATURES[:3]), 25).save_model(str(path))
    else:
        path = folder / "m.json"
        xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": 1},
                  xgb.DMatrix(x, y, feature_names=FEATURES), 25).save_model(str(path))
    return load_tree(path, fmt, schema, f"m-{fmt}")


def test_the_library_and_the_walk_give_the_same_logits(tree):
    sparse, dense = rows(700, seed=9)
    assert tree.native is not None and tree.native.available
    with torch.no_grad():
        fast, walked = tree(sparse, dense), tree.walk(tree.inputs(sparse, dense)).float()
    assert fast.shape == (700, 1) and fast.dtype == dense.dtype
    np.testing.assert_allclose(fast.numpy(), walked.numpy(), rtol=1e-5, atol=1e-5)
    assert len(np.unique(fast.numpy())) > 5  # a real forest, not a constant


def test_without_the_library_or_its_file_the_walk_scores(tree, schema):
    sparse, dense = rows(300, seed=11)
    with torch.no_grad():
        walked = tree.walk(tree.inputs(sparse, dense)).to(dense.dtype)
        shell = TreeModel.from_layout(tree.layout())  # as a fused model's config rebuilds it: no file attached
        shell.load_state_dict(tree.state_dict(), strict=True)
        assert shell.native is None and torch.equal(shell(sparse, dense), walked)
        absent = copy.deepcopy(tree)
        absent.native._available = False  # what an environment without the library answers
        assert torch.equal(absent(sparse, dense), walked)


def test_a_trace_records_the_walk_not_the_librarys_answer(tree):
    """A trace of the library's call would bake the traced rows' logits in as constants; the walk generalises."""
    with torch.no_grad():
        traced = torch.jit.trace(tree, rows(64, seed=1), check_trace=False)
        sparse, dense = rows(200, seed=2)
        np.testing.assert_allclose(traced(sparse, dense).numpy(), tree(sparse, dense).numpy(), rtol=1e-5, atol=1e-5)


def test_copies_and_pickles_carry_the_file_not_the_booster(tree):
    sparse, dense = rows(100, seed=4)
    with torch.no_grad():
        expected = tree(sparse, dense)
        for other in (copy.deepcopy(tree), pickle.loads(pickle.dumps(tree))):
            assert other.native is not tree.native and other.native.text == tree.native.text
            assert torch.equal(other(sparse, dense), expected)
    assert "native" not in "".join(tree.state_dict())  # never module state: the file is pinned elsewhere
