"""Tree members in the fused model (issue 26, ``emm.fusion.blend.OutputMember``): a tree's logit is one more donor
column of its task's blend, never decomposed nor thawed; its ``TreeModel.layout()`` rebuilds it with torch alone
and its tensors load strictly with the fused model's state dict; a tree no blend weighs is pruned like any donor;
an output head without donors refuses trees by name. Trees here are hand-written forests on the fake schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from emm.errors import EMMError
from emm.fusion.blend import OutputMember
from emm.fusion.fused import FusedModel, build_fused
from emm.fusion.options import AKFOptions, DecomposeConfig
from emm.fusion.prune import Dropped, find_pruning, prune
from emm.fusion.saved import architecture, build_from_config
from emm.models.tree_files import Node, build_forest
from emm.models.trees import TreeModel
from emm.weights import load_module, save_module
from tests.unit.test_akf import Pool, batch

FEATURES = ["s0", "s1", "s2", "d0", "d1"]  # the fake schema's features, sparse then dense


def forest(scale: float = 1.0):
    """Two trees: a numeric split on d0 (NaN goes right) and a categorical one on s1 (local codes 1, 3 go left)."""
    numeric = [Node(feature=3, threshold=0.5, default_left=False, left=1, right=2), Node(value=-1.0 * scale),
               Node(value=1.5 * scale)]
    categorical = [Node(feature=1, categories=[1, 3], left=1, right=2), Node(value=0.25 * scale),
                   Node(value=-0.75 * scale)]
    return build_forest("lightgbm", FEATURES, True, [numeric, categorical], base=0.0, scale=1.0, sigmoid=1.0,
                        objective="binary")


@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"])


def member(pool: Pool, name: str = "a-tree", task: str = "a", scale: float = 1.0) -> OutputMember:
    return OutputMember(name, task, TreeModel(forest(scale), pool.schema, name).eval(), f"{name}.txt", "0" * 64)


def fused(pool: Pool, outputs: list[OutputMember], **cfg) -> FusedModel:
    torch.manual_seed(0)
    options = {"output": "donor_residual", **cfg}
    return build_fused(pool.plan, pool.model_tasks, pool.tasks, AKFOptions(**options), pool.schema, outputs).eval()


def scores(model: torch.nn.Module, rows: int = 200) -> torch.Tensor:
    with torch.no_grad():
        return model(*batch(rows, seed=5))


def test_a_tree_layout_rebuilds_the_same_module_with_torch_alone(pool2):
    tree = member(pool2).module
    layout = json.loads(json.dumps(tree.layout()))  # as fused.json holds it
    shell = TreeModel.from_layout(layout)
    shell.load_state_dict(tree.state_dict(), strict=True)
    sparse, dense = batch(300, seed=1)
    dense[::7, 0] = float("nan")
    with torch.no_grad():
        assert torch.equal(shell(sparse, dense), tree(sparse, dense))
    assert shell.layout() == layout and not shell.training
    with pytest.raises(EMMError, match="tree model 'a-tree': its recorded layout is invalid"):
        TreeModel.from_layout({**layout, "tensors": {"value": [[2], "object"]}})


def test_the_trees_logit_is_a_donor_column_of_its_tasks_blend(pool2):
    tree = member(pool2)
    model = fused(pool2, [tree])
    n = pool2.plan.num_models
    assert model.donor_names == [*pool2.plan.names, "a-tree"]
    sparse, dense = batch(200, seed=5)
    with torch.no_grad():
        logits = model.donor_logits(sparse, dense)
        assert logits.shape == (200, n + 1) and torch.equal(logits[:, n:], tree.module(sparse, dense))
    a, b = pool2.tasks.index("a"), pool2.tasks.index("b")
    assert n in model.blend.members(a) and n not in model.blend.members(b)
    before = scores(model)
    with torch.no_grad():
        model.blend.weight[a, n] = 0.0  # the tree taken out of task a's blend: a's scores move, b's do not
    after = scores(model)
    assert not torch.allclose(before[:, a], after[:, a]) and torch.equal(before[:, b], after[:, b])
    labels = torch.stack([(dense[:, 0] > 0.5).float(), (dense[:, 1] > 0.5).float()], dim=1)
    fitted = model.prepare(sparse, dense, labels)
    assert set(fitted["a"]) >= {"a-tree", "bias"} and "a-tree" not in fitted["b"]
    assert fitted["a"]["a-tree"] > 0  # the tree splits on d0 at 0.5, which is task a's label here


def test_a_tree_is_never_trained(pool2):
    model = fused(pool2, [member(pool2)])
    thawed = model.unfreeze_pool()
    tree = model.donors.trees[0]
    assert thawed and not tree.value.requires_grad
    assert all(p is not tree.value for p in model.trainable_parameters())


def test_saved_with_a_tree_it_reloads_strictly_and_scores_the_same(pool2, tmp_path):
    model = fused(pool2, [member(pool2), member(pool2, "b-tree", "b", scale=2.0)], output="cross_residual")
    record = json.loads(json.dumps(architecture(pool2.specs, DecomposeConfig(), model)))
    assert [m["name"] for m in record["fused"]["output_members"]] == ["a-tree", "b-tree"]
    save_module(model, tmp_path / "fused.safetensors")
    rebuilt = build_from_config(record, pool2.schema)
    load_module(rebuilt, tmp_path / "fused.safetensors", what="fused model")
    assert torch.equal(scores(rebuilt.eval()), scores(model))


def test_a_tree_no_blend_weighs_is_pruned_like_a_donor(pool2, tmp_path):
    model = fused(pool2, [member(pool2)])
    n = pool2.plan.num_models
    with torch.no_grad():
        model.blend.weight[:, n] = 0.0
    assert "a-tree" in find_pruning(model).donors_off
    saved = prune(model)
    assert isinstance(saved.donors.trees[0], Dropped) and n not in saved.donors.kept
    assert torch.allclose(scores(saved), scores(model), atol=1e-6)
    record = json.loads(json.dumps(architecture(pool2.specs, DecomposeConfig(), saved)))
    save_module(saved, tmp_path / "fused.safetensors")
    rebuilt = build_from_config(record, pool2.schema)
    load_module(rebuilt, tmp_path / "fused.safetensors", what="fused model")  # no tree tensors expected
    assert torch.equal(scores(rebuilt.eval()), scores(saved))


def test_a_weighted_tree_is_kept_by_pruning(pool2):
    model = fused(pool2, [member(pool2)])
    assert "a-tree" not in find_pruning(model).donors_off
    weight = float(model.blend.weight.detach()[0, pool2.plan.num_models])
    assert np.isclose(weight, 1 / 3)  # the mean of task a's three donors


def test_an_output_head_without_donors_refuses_trees_by_name(pool2):
    with pytest.raises(EMMError, match=r"pool model\(s\) \['a-tree'\] are tree models.*output 'tower' keeps no "
                                       r"donors; set fuse.output to donor_residual"):
        fused(pool2, [member(pool2)], output="tower")
    with pytest.raises(EMMError, match=r"tree model\(s\) \['c-tree'\] are for task\(s\) \['c'\]"):
        fused(pool2, [member(pool2, "c-tree", "c")])
