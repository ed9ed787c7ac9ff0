"""The fused model the fuse stage saves computes only what changes its output (issue 25, ``emm.fusion.prune``): a
task whose residual tower is exactly zero runs no tower (and, when every task is so, no AKF work at all), a donor
no blend weighs is not run, and AKF level 0 is computed once for itself and the donors when they are the same
modules. Scores equal the unpruned model's, the saved form reloads strictly, and the FLOPs counted drop."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from emm.errors import EMMError
from emm.fusion.fused import FusedModel
from emm.fusion.options import DecomposeConfig
from emm.fusion.prune import Dropped, Pruning, find_pruning, prune
from emm.fusion.saved import architecture, build_from_config
from emm.train.cost import model_cost
from emm.weights import load_module, save_module
from tests.unit.test_akf import Pool, batch

ATOL = 1e-6


@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"])


def trained(pool: Pool, *, zero: tuple[int, ...] = (), **cfg) -> FusedModel:
    """A fused model whose every trainable parameter moved (as training leaves it), then the residual of each task
    in ``zero`` put back to exactly zero (as ``restore_start`` does for a task no better than at step 0)."""
    model = pool.fused(**cfg).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for t in zero:
            model.towers[t].net[-1].weight.zero_()
            model.towers[t].net[-1].bias.zero_()
    return model


def scores(model: nn.Module, rows: int = 300, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model(*batch(rows, seed=seed))


def flops(model: nn.Module) -> int:
    return model_cost(model, *batch(64, seed=1)).flops_per_row


def reloaded(pool: Pool, model: FusedModel, tmp_path) -> FusedModel:
    """``model`` saved as the fuse stage saves it (fused.json's architecture + safetensors) and loaded back strictly."""
    record = json.loads(json.dumps(architecture(pool.specs, DecomposeConfig(), model)))
    save_module(model, tmp_path / "fused.safetensors")
    rebuilt = build_from_config(record, pool.schema)
    load_module(rebuilt, tmp_path / "fused.safetensors", what="fused model")  # strict: every key, every shape
    return rebuilt.eval()


@pytest.mark.parametrize("output", ["donor_residual", "cross_residual"])
def test_a_task_with_a_zero_residual_runs_no_tower_and_scores_the_same(pool2, output):
    model = trained(pool2, zero=(1,), output=output)
    pruned = prune(model)
    assert pruned.pruning == Pruning(residual_off=("b",))
    assert isinstance(pruned.towers[1], Dropped) and not isinstance(pruned.towers[0], Dropped)
    assert len(pruned.levels) == len(model.levels) and pruned.embedding is not None  # task a still needs them
    torch.testing.assert_close(scores(pruned), scores(model), rtol=0, atol=ATOL)
    with torch.no_grad():
        blend = model.blend(model.donor_logits(*batch(300, seed=3)))
    assert not torch.allclose(scores(pruned)[:, 0], blend[:, 0])  # a's residual is real, and kept
    assert flops(pruned) < flops(model)
    assert set(pruned.state_dict()) == set(model.state_dict()) - {k for k in model.state_dict()
                                                                  if k.startswith("towers.1.")}


@pytest.mark.parametrize("output", ["donor_residual", "cross_residual"])
def test_when_no_task_keeps_a_residual_no_akf_work_is_run_or_stored(pool2, output, tmp_path):
    model = trained(pool2, zero=(0, 1), output=output)
    pruned = prune(model)
    assert pruned.pruning.stack_off(pruned.task_names)
    assert pruned.embedding is None and len(pruned.levels) == 0
    assert not any(k.startswith(("embedding.", "levels.", "towers.")) for k in pruned.state_dict())
    want = scores(model)
    torch.testing.assert_close(scores(pruned), want, rtol=0, atol=ATOL)
    with torch.no_grad():  # what is left is exactly the donors' blend
        torch.testing.assert_close(want, model.blend(model.donor_logits(*batch(300, seed=3))), rtol=0, atol=ATOL)
    assert flops(pruned) < flops(model) / 2
    again = reloaded(pool2, pruned, tmp_path)
    assert again.pruning == pruned.pruning and again.state_dict().keys() == pruned.state_dict().keys()
    assert torch.equal(scores(again), scores(pruned))


def test_a_donor_no_blend_weighs_is_not_run(pool2, tmp_path):
    model = trained(pool2, zero=(0, 1), output="cross_residual")
    with torch.no_grad():
        model.blend.weight[:, 2] = 0.0  # b's first donor, in every task's cross-task blend
    pruned = prune(model)
    assert pruned.pruning.donors_off == (model.model_names[2],)
    assert pruned.donors.kept == [0, 1, 3] and len(pruned.donors.paths[2]) == 0
    assert not any(k.startswith("donors.paths.2.") for k in pruned.state_dict())
    torch.testing.assert_close(scores(pruned), scores(model), rtol=0, atol=ATOL)
    assert flops(pruned) < flops(prune(trained(pool2, zero=(0, 1), output="cross_residual")))
    torch.testing.assert_close(scores(reloaded(pool2, pruned, tmp_path)), scores(model), rtol=0, atol=ATOL)


def test_a_donor_weighed_by_one_task_only_keeps_running(pool2):
    model = trained(pool2, zero=(0, 1), output="cross_residual")
    with torch.no_grad():
        model.blend.weight[0, 2] = 0.0  # task a ignores it, task b does not
    assert prune(model).pruning.donors_off == ()


def test_the_donors_take_akf_level_0_when_it_runs_their_own_first_pieces(pool2, tmp_path):
    model = trained(pool2, zero=(1,), output="donor_residual", embedding="reuse")
    pruned = prune(model)
    assert pruned.pruning.shared_level0 and pruned.donors.shares_first
    assert all(isinstance(pruned.donors.paths[i][0], Dropped) for i in range(4))
    torch.testing.assert_close(scores(pruned), scores(model), rtol=0, atol=ATOL)
    torch.testing.assert_close(pruned.donor_logits(*batch(50)), model.donor_logits(*batch(50)), rtol=0, atol=ATOL)
    torch.testing.assert_close(scores(reloaded(pool2, pruned, tmp_path)), scores(model), rtol=0, atol=ATOL)
    with torch.no_grad():  # a fine-tune that moved the donors' copy: no longer the same module, nothing shared
        model.donors.paths[0][0].embedding.embedding.weight.add_(0.01)
    assert not find_pruning(model).shared_level0


def test_a_model_with_nothing_to_prune_is_left_as_it_is(pool2, tmp_path):
    model = trained(pool2, output="donor_residual")  # retrain: level 0 is the fresh embedding, not the donors'
    pruned = prune(model)
    assert pruned.pruning.empty and "pruned" not in pruned.config_dict()
    assert pruned.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(scores(pruned), scores(model)) and flops(pruned) == flops(model)
    assert torch.equal(scores(reloaded(pool2, pruned, tmp_path)), scores(model))


@pytest.mark.parametrize("tiny", [1e-30, -1e-30])
def test_a_residual_that_is_not_exactly_zero_is_never_pruned(pool2, tiny):
    model = trained(pool2, zero=(0, 1), output="donor_residual")
    with torch.no_grad():
        model.towers[1].net[-1].weight[0, 0] = tiny  # a weight, not only a bias
    assert find_pruning(model).residual_off == ("a",)
    with torch.no_grad():
        model.towers[1].net[-1].weight.zero_()
        model.towers[1].net[-1].bias.fill_(tiny)
    assert find_pruning(model).residual_off == ("a",)
    assert find_pruning(trained(pool2, output="tower")).empty  # a trained tower head is all residual


def test_the_saved_record_says_what_was_left_out_and_why(pool2):
    model = trained(pool2, zero=(0, 1), output="cross_residual")
    with torch.no_grad():
        model.blend.weight[:, 3] = 0.0
    record = prune(model).config_dict()["pruned"]
    assert record["residual_off"] == ["a", "b"] and record["donors_off"] == [model.model_names[3]]
    assert set(record["why"]) == {"residual_off", "stack_off", "donors_off"}


def test_a_pruned_model_is_for_scoring_only(pool2):
    pruned = prune(trained(pool2, zero=(1,), output="donor_residual"))
    x = batch(20)
    with pytest.raises(EMMError, match="pruned for scoring"):
        pruned.prepare(*x, torch.zeros(20, 2))
    with pytest.raises(EMMError, match="pruned for scoring"):
        pruned.start_state()
    with pytest.raises(EMMError, match="pruned for scoring"):
        pruned.unfreeze_pool()


def test_a_config_that_prunes_what_the_model_lacks_is_refused(pool2):
    config = json.loads(json.dumps(prune(trained(pool2, zero=(0, 1), output="donor_residual")).config_dict()))
    with pytest.raises(EMMError, match=r"prunes \['c'\]"):
        FusedModel.from_config(pool2.plan, {**config, "pruned": {**config["pruned"], "residual_off": ["a", "c"]}})
    tower = json.loads(json.dumps(pool2.fused(output="tower").config_dict()))
    with pytest.raises(EMMError, match="keeps none"):
        FusedModel.from_config(pool2.plan, {**tower, "pruned": {"donors_off": [pool2.specs[0].name]}})
