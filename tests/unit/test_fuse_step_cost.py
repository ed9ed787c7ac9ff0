"""The fused model's training step does no work twice (issue 25): AKF level 0 is computed once per batch for itself
and the donors while both are the same frozen modules (``emm.fusion.shared``), and MTM applies a linear V once, to
the attention-weighted mix (``emm.fusion.akf``). Logits and gradients equal the unshared computation's."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from emm.fusion import prune, shared
from emm.fusion.akf import MultiTaskMerge
from emm.fusion.fused import FusedModel
from emm.fusion.shared import Level0Sharing
from tests.unit.test_akf import Pool, batch, labels

ATOL = 1e-6


@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"])


class Never(Level0Sharing):
    """The unshared forward, as the model computed it before: level 0 and every donor path each run their own."""

    def holds(self, model: FusedModel) -> bool:
        return False


def literal_mtm(merge: MultiTaskMerge, own: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """MTM as eqs. 4-6 write it, V on both members and then their mix: what ``MultiTaskMerge`` computed before."""
    pair = torch.stack([own, other], dim=1)
    scores = (merge.scoring.queries(merge.q, own, pair) * merge.k(pair)).sum(-1) / merge.qkv_dim ** 0.5
    c = torch.softmax(scores, dim=-1)
    return (c.unsqueeze(-1) * merge.v(pair)).sum(dim=1), c


def unshared(model: FusedModel) -> FusedModel:
    """A copy that computes the training step as before: no level 0 handed to the donors, MTM as written."""
    reference = copy.deepcopy(model)
    reference.level0_sharing = Never()
    for level in reference.levels:
        for merge in level.merges or []:
            merge.forward = types.MethodType(literal_mtm, merge)
    return reference


def moved(pool: Pool, **cfg) -> FusedModel:
    """A donor-residual model with level 0 fused on the raw inputs and every trainable parameter moved (a residual
    of exactly zero would hide any difference in what lies below it)."""
    model = pool.fused(output="donor_residual", embedding="reuse", **cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.train()


def step(model: FusedModel, rows: int = 96) -> tuple[Tensor, dict[str, Tensor]]:
    """One training step's logits and the gradient of every parameter that gets one."""
    x = batch(rows, seed=5)
    model.zero_grad(set_to_none=True)
    logits = model(*x)
    F.binary_cross_entropy_with_logits(logits, labels(x, len(model.task_names))).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def first_piece_calls(model: FusedModel) -> list[int]:
    calls = [0] * len(model.donors.paths)
    for i, path in enumerate(model.donors.paths):
        path[0].register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def assert_same_step(model: FusedModel, reference: FusedModel) -> None:
    logits, grads = step(model)
    ref_logits, ref_grads = step(reference)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=ATOL, msg=name)


def test_the_donors_take_akf_level_0_while_training_and_nothing_changes(pool2):
    model = moved(pool2)
    reference = unshared(model)
    calls = first_piece_calls(model)
    assert_same_step(model, reference)
    assert calls == [0, 0, 0, 0]  # level 0 ran once; no donor ran its own copy
    model.eval()
    with torch.no_grad():  # scoring (validation) shares it too
        torch.testing.assert_close(model(*batch(40)), reference.eval()(*batch(40)), rtol=0, atol=ATOL)
    assert calls == [0, 0, 0, 0]


def test_the_proof_is_taken_once_and_again_only_when_what_it_rests_on_changes(pool2, monkeypatch):
    proofs: list[int] = []
    monkeypatch.setattr(shared, "level0_shareable", lambda model: proofs.append(1) or prune.level0_shareable(model))
    model = moved(pool2)
    calls = first_piece_calls(model)
    for _ in range(3):
        step(model)
    assert len(proofs) == 1
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # a checkpoint loaded: written in place, still equal
    step(model)
    assert len(proofs) == 2 and calls == [0, 0, 0, 0]


def test_a_donor_copy_that_moved_is_run_again(pool2):
    model = moved(pool2)
    with torch.no_grad():  # a checkpoint or a fine-tune wrote into one donor's copy: no longer level 0's module
        model.donors.paths[2][0].embedding.embedding.weight.add_(0.01)
    reference = unshared(model)
    calls = first_piece_calls(model)
    assert_same_step(model, reference)
    assert calls == [1, 1, 1, 1]


def test_a_thawed_pool_shares_nothing_and_every_copy_gets_its_own_gradient(pool2):
    model = moved(pool2)
    step(model)  # shared while frozen
    model.unfreeze_pool()
    reference = unshared(model)
    calls = first_piece_calls(model)
    assert_same_step(model, reference)
    assert calls == [1, 1, 1, 1]
    _, grads = step(model)
    assert any(n.startswith("donors.paths.0.0.") for n in grads) and any(n.startswith("levels.0.components.0.")
                                                                        for n in grads)


def test_a_different_level_0_is_never_shared(pool2):
    model = moved(pool2, ablation="+mtm")  # re-drawn, trainable components: not the donors' modules
    calls = first_piece_calls(model)
    step(model)
    assert calls == [1, 1, 1, 1]


@pytest.mark.parametrize("value_relu", [False, True])
@pytest.mark.parametrize("attention", ["task_query", "self_score"])
def test_mtm_applies_a_linear_v_once_to_the_mix(value_relu, attention):
    torch.manual_seed(0)
    merge = MultiTaskMerge(12, 5, attention, value_relu).double()
    with torch.no_grad():
        merge.v[0].weight.add_(0.3 * torch.randn(12, 12, dtype=torch.float64))
        merge.v[0].bias.add_(0.5 * torch.randn(12, dtype=torch.float64))
    own, other = (torch.randn(33, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weights = torch.randn(33, 12, dtype=torch.float64)
    rows: list[int] = []
    hook = merge.v[0].register_forward_hook(lambda mod, args, out: rows.append(args[0].reshape(-1, 12).shape[0]))
    results = []
    for forward in (merge, lambda a, b: literal_mtm(merge, a, b)):
        for t in (own, other, *merge.parameters()):
            t.grad = None
        z, c = forward(own, other)
        (z * weights).sum().backward()
        results.append([z.detach(), c.detach(), own.grad, other.grad, *(p.grad for p in merge.parameters())])
    hook.remove()
    assert rows[0] == (66 if value_relu else 33)  # a linear V: one row per batch row, not one per pair member
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)  # the same function: float64 rounding apart


def test_a_whole_model_whose_level0_is_shared_still_exports(pool2: Pool) -> None:
    """torch.export (what ONNX export and ``score_speed``'s unpruned side run) cannot read tensor values, which the
    sharing proof does: while tracing, the whole model computes level 0 unshared, the same function."""
    model = moved(pool2).eval()
    x = batch(8, seed=3)
    assert model.level0_sharing.holds(model)  # shared in eager mode
    program = torch.export.export(model, x)
    assert torch.allclose(program.module()(*x), model(*x), atol=ATOL)
