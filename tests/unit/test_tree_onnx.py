"""Tree members in an ONNX file are ``ai.onnx.ml`` ``TreeEnsemble`` nodes (``emm.models.tree_onnx``), scored by
onnxruntime exactly as the torch walk scores them: NaNs, zeros (LightGBM's missing types NaN, Zero and None),
negative, fractional and unseen category codes, infinities. Boosters are small, trained on random rows of the
fake schema (tests.unit.test_akf), as in tests/unit/test_tree_native.py."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightgbm as lgb
import numpy as np
import onnx
import pytest
import torch
import xgboost as xgb
from onnx import TensorProto, helper
from torch import nn

from emm.models.tree_onnx import ML_DOMAIN, ML_OPSET, ensemble_nodes, trees_as_inputs
from emm.models.trees import TreeModel, load_tree
from emm.pipeline.export import agrees, compare, export_onnx, onnx_session
from tests.unit.test_akf import batch, make_schema

FEATURES = ["s0", "s1", "s2", "d0", "d1"]  # the fake schema's features, sparse then dense (local codes, floats)
BOOSTERS = {  # name: (format, LightGBM parameters, categorical features)
    "lgbm-categorical": ("lightgbm", {}, FEATURES[:3]),
    "lgbm-numbers-zero-missing": ("lightgbm", {"zero_as_missing": True}, []),
    "lgbm-no-missing": ("lightgbm", {"use_missing": False}, FEATURES[:2]),
    "xgboost": ("xgboost", {}, []),
}


def train_rows(schema, n: int, seed: int) -> np.ndarray:
    """The booster matrix EMM feeds (local codes, dense floats) with NaNs and zeros in the dense columns."""
    sparse, dense = batch(n, seed=seed)
    offsets = torch.tensor([f.offset for f in schema.sparse])
    x = torch.cat([(sparse - offsets).double(), dense.double()], dim=1).numpy()
    x[::5, 3] = np.nan
    x[1::7, 3] = 0.0
    x[2::9, 4] = 0.0
    return x


def hard_rows(x: np.ndarray) -> np.ndarray:
    """Rows at every edge the walk's rule has: NaN, +-0, tiny (|v| <= 1e-35 is LightGBM's zero), infinities, and as
    category codes -1, -0.5, fractions, codes never seen (past every listed category) and past MAX_CODE."""
    out = np.repeat(x[:40], 12, axis=0).astype(np.float32)
    edges = np.array([np.nan, 0.0, -0.0, 1e-36, -1e-36, np.inf, -np.inf, -1.0, -0.5, 2.5, 97.0, 3e9], np.float32)
    for j in range(x.shape[1]):
        out[j::x.shape[1], j] = np.resize(edges, len(out[j::x.shape[1]]))
    return out


@pytest.fixture(scope="module")
def schema():
    return make_schema(["a", "b"])


@pytest.fixture(scope="module", params=list(BOOSTERS))
def tree(request, schema, tmp_path_factory) -> TreeModel:
    fmt, extra, categorical = BOOSTERS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    x = train_rows(schema, 2000, seed=3)
    noise = np.random.default_rng(0).normal(size=len(x))  # so the trees split on every column, not one rule
    score = np.nan_to_num(x[:, 3], nan=0.8) + (x[:, 1] % 3 == 0) - (x[:, 0] % 4 == 1) + x[:, 4] + (x[:, 4] == 0)
    y = (score + 0.5 * np.sin(3 * x[:, 2]) + 0.3 * noise > 1.2).astype(int)
    if fmt == "lightgbm":
        path = folder / "m.txt"
        params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1, "seed": 1,
                  "min_data_per_group": 5, "cat_smooth": 1, "min_data_in_leaf": 5, **extra}
        lgb.train(params, lgb.Dataset(x, y, feature_name=FEATURES, categorical_feature=categorical or "auto"),
                  20).save_model(str(path))
    else:
        path = folder / "m.json"
        xgb.train({"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": 1},
                  xgb.DMatrix(x, y, feature_names=FEATURES), 20).save_model(str(path))
    return load_tree(path, fmt, schema, request.param)


def ensemble_only(tree: TreeModel, n_columns: int) -> bytes:
    """A graph of just the member: booster input ``x`` -> its logit."""
    nodes = ensemble_nodes(tree, "x", "logit", "t_")
    graph = helper.make_graph(nodes, "tree", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, n_columns])],
                              [helper.make_tensor_value_info("logit", TensorProto.FLOAT, [None, 1])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(ML_DOMAIN, ML_OPSET)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_the_ensemble_node_gives_the_walks_margins(tree, schema):
    import onnxruntime as ort

    assert tree.format == BOOSTERS[tree.name][0]
    if tree.name == "lgbm-categorical":
        assert tree.has_categorical
    if tree.name == "lgbm-numbers-zero-missing":
        assert tree.has_zero_missing and not tree.has_categorical
    x = hard_rows(train_rows(schema, 200, seed=9))
    session = ort.InferenceSession(ensemble_only(tree, x.shape[1]), providers=["CPUExecutionProvider"])
    got = session.run(["logit"], {"x": x})[0]
    with torch.no_grad():
        walked = tree.walk(torch.from_numpy(x)).float().numpy()
    assert got.shape == walked.shape == (len(x), 1)
    np.testing.assert_allclose(got, walked, rtol=0, atol=1e-6)
    assert len(np.unique(walked)) > 20  # the rows reach many leaves, not one


class Small(nn.Module):
    """A network and a tree member side by side, as a fused model's blend reads them."""

    def __init__(self, tree: TreeModel, n_dense: int) -> None:
        super().__init__()
        self.net = nn.Linear(n_dense, 1)
        self.trees = nn.ModuleList([tree])

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(dense.nan_to_num()), self.trees[0](sparse, dense) + self.net(dense.nan_to_num())],
                         dim=1)


def test_a_model_with_a_tree_exports_the_node_not_the_walk(tree, schema, tmp_path: Path):
    model = Small(tree, schema.n_dense).eval()
    sparse, dense = batch(300, seed=5)
    dense = dense.clone()
    dense[::4, 0] = float("nan")
    dense[1::6, 1] = 0.0
    export_onnx(model, tmp_path / "m.onnx", (sparse[:64], dense[:64]))
    assert isinstance(model.trees[0], TreeModel)  # put back after the export
    proto = onnx.load(str(tmp_path / "m.onnx"))
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("TreeEnsemble") == 1 and len(kinds) < 60  # the walk would be hundreds of nodes
    assert "GatherElements" not in kinds, kinds  # the walk reads each node's input so
    assert [i.name for i in proto.graph.input] == ["sparse", "dense"] and len(proto.graph.output) == 1
    check = compare(model, onnx_session(tmp_path / "m.onnx"), sparse, dense)
    assert agrees(check), check


def test_a_model_without_trees_is_left_alone():
    model = nn.Linear(2, 1)
    with trees_as_inputs(model) as trees:
        assert trees is None


def handmade(schema) -> TreeModel:
    """Trees no small training run reliably makes: a single leaf, a categorical split that lists no category
    (everything goes right), one that lists categories 0 and 2, a Zero-missing split whose default is right."""
    from emm.models.tree_files import MISSING_NAN, MISSING_NONE, MISSING_ZERO, Node, build_forest

    split = partial(Node, left=1, right=2)
    trees = [[Node(value=0.25)],
             [split(feature=0, categories=[], missing=MISSING_NAN), Node(value=1.0), Node(value=-1.0)],
             [split(feature=1, categories=[0, 2], missing=MISSING_NONE), Node(value=2.0), Node(value=-2.0)],
             [split(feature=3, threshold=0.5, default_left=False, missing=MISSING_ZERO), Node(value=4.0),
              Node(value=-4.0)]]
    forest = build_forest("lightgbm", FEATURES, True, trees, base=0.0, scale=1.0, sigmoid=1.0, objective="binary")
    return TreeModel(forest, schema, "handmade").eval()


def test_single_leaves_and_empty_category_sets_score_as_the_walk(schema):
    import onnxruntime as ort

    tree = handmade(schema)
    x = hard_rows(train_rows(schema, 200, seed=9))
    session = ort.InferenceSession(ensemble_only(tree, x.shape[1]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        walked = tree.walk(torch.from_numpy(x)).float().numpy()
    np.testing.assert_allclose(session.run(["logit"], {"x": x})[0], walked, rtol=0, atol=1e-6)
    assert len(np.unique(walked)) == 4  # both branches of the two splits that can go left, in every combination


def test_a_set_the_node_cannot_express_is_refused_naming_the_member(schema):
    from emm.errors import EMMError

    tree = handmade(schema)
    node = int(torch.nonzero(tree.categorical)[0])
    tree.cat_table[tree.cat_lo[node]] = 0  # NaN/negative codes sent left: no category_table writes that
    with pytest.raises(EMMError, match="tree member 'handmade': categorical node"):
        ensemble_nodes(tree, "x", "logit", "t_")
