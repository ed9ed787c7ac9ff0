"""The multi-task baselines (shared-bottom, MMoE, PLE, AITM, AdaTT-sp) and their registry, on a tiny fake
schema with 2 and 3 tasks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from emm.data.schema import Schema
from emm.errors import EMMError
from emm.models.baselines.aitm import AITM
from emm.models.baselines.registry import BASELINES, build_baseline
from tests.unit.test_akf import N_SPARSE, VOCAB, batch
from tests.unit.test_akf import make_schema as akf_schema

NAMES = sorted(BASELINES)


def make_schema(n_tasks: int) -> Schema:
    return akf_schema([f"t{k}" for k in range(n_tasks)])


def labels(sparse: Tensor, dense: Tensor, n_tasks: int) -> Tensor:
    """A deterministic, learnable function of the inputs per task."""
    raw = sparse - torch.arange(N_SPARSE) * VOCAB
    rules = [dense[:, 0] > 0.5, raw[:, 0] < 2, (raw[:, 1] >= 3) ^ (dense[:, 1] > 0.5)]
    return torch.stack(rules[:n_tasks], dim=1).float()


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name: str, n_tasks: int) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, make_schema(n_tasks))
    out = model(*batch(7))
    assert out.shape == (7, n_tasks)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_loss_falls(name: str, n_tasks: int) -> None:
    torch.manual_seed(0)
    model = build_baseline(name, make_schema(n_tasks))
    sparse, dense = batch(256, seed=1)
    y = labels(sparse, dense, n_tasks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss() -> Tensor:
        return F.binary_cross_entropy_with_logits(model(sparse, dense), y)

    with torch.no_grad():
        before = loss().item()
    for _ in range(30):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("n_tasks", [2, 3])
def test_aitm_information_flows_forward_only(n_tasks: int) -> None:
    torch.manual_seed(0)
    model = build_baseline("aitm", make_schema(n_tasks))
    assert isinstance(model, AITM)
    logits, z = model.forward_with_reps(*batch(16))
    assert len(z) == n_tasks
    for t in range(1, n_tasks):
        # task t's output depends on task t-1's tower input ...
        (forward,) = torch.autograd.grad(logits[:, t].sum(), z[t - 1], retain_graph=True)
        assert forward.abs().sum() > 0
        # ... and task t-1's output does not depend on task t's.
        (backward,) = torch.autograd.grad(logits[:, t - 1].sum(), z[t], retain_graph=True, allow_unused=True)
        assert backward is None or backward.abs().sum() == 0
    # task 0 sees no other task at all: its output depends only on its own bottom.
    (first,) = torch.autograd.grad(logits[:, 0].sum(), z[-1], retain_graph=True, allow_unused=True)
    assert first is None or first.abs().sum() == 0


def test_paper_sized_defaults() -> None:
    schema = make_schema(2)
    ple = build_baseline("ple", schema)
    level = ple.levels[0]
    assert (level.n_shared, level.n_specific) == (4, 4)  # 4 shared + 4 per task = 12 per level
    assert len(ple.levels) == 2
    adatt = build_baseline("adatt", schema)
    assert len(adatt.levels) == 2 and adatt.levels[0].n_specific * 2 == 12
    assert build_baseline("mmoe", schema).experts.n == 12
    assert build_baseline("ple", make_schema(3)).levels[1].n_specific == 3  # 3 shared + 3 x 3 = 12


def test_kwargs_reach_builder() -> None:
    model = build_baseline("mmoe", make_schema(2), n_experts=3, expert_hidden=[8, 4])
    assert model.experts.n == 3 and model.experts.out_dim == 4
    assert model(*batch(5)).shape == (5, 2)


def test_unknown_baseline() -> None:
    with pytest.raises(EMMError) as info:
        build_baseline("nope", make_schema(2))
    for name in BASELINES:
        assert name in str(info.value)
    assert set(BASELINES) == {"shared_bottom", "mmoe", "ple", "aitm", "adatt"}
