"""The compact serving model (``emm compress``): its widths from a FLOPs budget, its training targets (the
teacher's probability on every row, labelled or not), the gate that decides registration, and that
``emm promote`` never makes a compact version champion."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.models.embedding import NumericOptions
from emm.models.single_task import ModelSpec, build_model
from emm.pipeline.compress import gate
from emm.train.compact import (WIDTH_STEP, CompactOptions, CompactSpec, bottom_widths, build_compact,
                               build_from_config, flush_tiny_weights, soft_targets, spec_for_budget, train_compact,
                               warm_start)
from emm.train.cost import model_cost
from emm.train.options import TrainConfig
from tests.unit.test_akf import batch, make_schema

SCHEMA = make_schema(["a", "b"])


def rows(n: int = 256, seed: int = 0, labels: torch.Tensor | None = None) -> SplitTensors:
    sparse, dense = batch(n, seed=seed)
    return SplitTensors(sparse, dense, torch.zeros(n, 2) if labels is None else labels, ["a", "b"])


def cost_of(first: int, opts: CompactOptions) -> int:
    spec = CompactSpec(bottom=bottom_widths(first, opts.layers), tower=opts.tower, embed_dim=opts.embed_dim,
                       numeric=opts.numeric)
    data = rows()
    return model_cost(build_compact(spec, SCHEMA), data.sparse, data.dense).flops_per_row


@pytest.mark.parametrize("budget, layers", [(3_000, 1), (20_000, 2), (150_000, 3)])
def test_the_budget_picks_the_widest_bottom_that_fits(budget: int, layers: int) -> None:
    opts = CompactOptions(flops_per_row=budget, layers=layers)
    spec, cost = spec_for_budget(SCHEMA, opts, rows())
    first = spec.bottom[0]
    assert spec.bottom == bottom_widths(first, layers) and len(spec.bottom) == layers
    assert all(w % WIDTH_STEP == 0 for w in spec.bottom)
    assert cost.flops_per_row == cost_of(first, opts) <= budget  # the cost is measured, and fits
    assert cost_of(first + WIDTH_STEP, opts) > budget  # one step wider would not


def test_a_larger_budget_never_gives_a_narrower_model() -> None:
    firsts = [spec_for_budget(SCHEMA, CompactOptions(flops_per_row=b), rows())[0].bottom[0]
              for b in (5_000, 10_000, 40_000, 80_000)]
    assert firsts == sorted(firsts) and firsts[0] < firsts[-1]


def test_the_widest_model_is_capped_by_max_width() -> None:
    spec, _ = spec_for_budget(SCHEMA, CompactOptions(flops_per_row=10**9, max_width=64), rows())
    assert spec.bottom == [64, 32]


def test_a_budget_below_the_smallest_model_names_its_cost() -> None:
    smallest = cost_of(WIDTH_STEP, CompactOptions())
    with pytest.raises(EMMError, match=rf"compress.flops_per_row 100 is below .* {smallest:,} FLOPs per row"):
        spec_for_budget(SCHEMA, CompactOptions(flops_per_row=100), rows())


def test_the_compact_model_rebuilds_from_its_recorded_spec() -> None:
    """What the registered pyfunc does: spec JSON -> the same architecture, the saved weights fit it."""
    spec, _ = spec_for_budget(SCHEMA, CompactOptions(flops_per_row=20_000), rows())
    torch.manual_seed(0)
    model = build_compact(spec, SCHEMA).eval()
    again = build_from_config(spec.model_dump(mode="json"), SCHEMA).eval()
    again.load_state_dict(model.state_dict())
    data = rows(seed=3)
    with torch.no_grad():
        assert torch.equal(model(data.sparse, data.dense), again(data.sparse, data.dense))


def test_tiny_weights_are_set_to_zero_and_the_scores_stay_the_same() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    # what weight decay leaves on units that stopped learning. Normal floats only: denormal ones would be stored as 0
    # in a process where an onnxruntime session turned on denormals-as-zero (the speed benchmark's tuned sessions)
    with torch.no_grad():
        model[0].weight[0, :3] = torch.tensor([1e-37, -3e-33, 1e-25])
        model[2].weight[1, 5], model[2].bias[1] = -1e-30, 1e-19  # the bias is above TINY_WEIGHT: kept
    x = torch.rand(512, 6) * 100
    before = model(x).detach()
    assert flush_tiny_weights(model) == 4
    assert int((model[0].weight[0, :3] == 0).sum()) == 3 and model[2].weight[1, 5] == 0 and model[2].bias[1] == 1e-19
    assert torch.equal(model(x).detach(), before) and flush_tiny_weights(model) == 0


class Teacher(nn.Module):
    """A fixed function of the inputs, as a fused model would be: logits [B, 2] (one parameter: models have some)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        first = (sparse[:, 0] % 5).float() - 2.0
        return self.scale * torch.stack([2.0 * first + dense[:, 0], 3.0 * dense[:, 1] - 1.5], dim=1)


def test_soft_targets_are_the_teachers_probabilities_on_every_row_labelled_or_not() -> None:
    labels = torch.tensor([[1.0, float("nan")], [float("nan"), float("nan")], [0.0, 1.0]]).repeat(20, 1)
    data = rows(60, labels=labels)
    soft = soft_targets(Teacher(), data)
    expected = torch.sigmoid(Teacher()(data.sparse, data.dense))
    assert torch.allclose(soft.labels, expected) and not soft.labels.isnan().any()
    assert torch.equal(soft.sparse, data.sparse) and torch.equal(soft.dense, data.dense)


def test_a_student_learns_the_teacher_from_rows_that_carry_no_label() -> None:
    """Every training label missing: the teacher is the only signal, and it is enough (val scores labels)."""
    train = rows(2048, seed=1, labels=torch.full((2048, 2), float("nan")))
    val_rows = rows(512, seed=2)
    val = SplitTensors(val_rows.sparse, val_rows.dense,
                       (Teacher()(val_rows.sparse, val_rows.dense) > 0).float(), ["a", "b"])
    opts = CompactOptions(flops_per_row=20_000, numeric={"mode": "minmax"},
                          train=TrainConfig(lr=0.02, batch_size=256, max_epochs=4, patience=2, device="cpu"))
    result = train_compact(Teacher(), SCHEMA, train, val, opts)
    assert result.fit.best_val_auc > 0.9
    assert result.cost.flops_per_row <= 20_000 and result.spec.bottom[0] >= WIDTH_STEP


def ci(diff: float, low: float, high: float) -> dict:
    return {"diff": diff, "low": low, "high": high}


def test_the_gate_passes_only_when_every_task_is_within_the_bound() -> None:
    within, reasons = gate({"a": ci(-0.0001, -0.0004, 0.0002), "b": ci(0.0003, 0.0001, 0.0005)}, 0.0002)
    assert within and reasons == []
    per_task = {"a": ci(-0.0002, -0.0005, 0.0001), "b": ci(-0.00021, -0.0004, 0.0)}
    within, reasons = gate(per_task, 0.0002)
    assert not within and len(reasons) == 1 and reasons[0].startswith("b: compact − fused -0.00021")
    assert per_task["a"]["within"] and not per_task["b"]["within"]  # the bound itself is within
    assert not per_task["a"]["ci_within"]  # the CI's lower end is recorded, not required


def test_promote_refuses_a_compact_version(monkeypatch) -> None:
    from emm.pipeline import register
    from emm.tracking import registry

    compact = SimpleNamespace(version="3", name="emm-x",
                              tags={registry.COMPACT_TAG: "true", registry.SCORE_TAG: "0.99"})
    moved = []
    monkeypatch.setattr(registry, "require_model", lambda *a, **k: None)
    monkeypatch.setattr(registry, "get_version", lambda name, version: compact)
    monkeypatch.setattr(registry, "version_by_alias", lambda name, alias: None)  # no champion: it would win
    monkeypatch.setattr(registry, "set_alias", lambda *a: moved.append(a))
    with pytest.raises(EMMError, match=r"version 3 of 'emm-x' is a compact model .* models:/emm-x@fast"):
        register.promote("x", "unused-store", "3")
    assert moved == []


def member(arch: str = "mlp", embed_dim: int = 8, mode: str = "periodic", seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    spec = ModelSpec(name=f"a-{arch}", task="a", arch=arch, hidden=[16, 8], embed_dim=embed_dim, cross_layers=1,
                     numeric=NumericOptions(mode=mode))
    model = build_model(spec, SCHEMA)
    with torch.no_grad():  # "trained": weights no fresh model has
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["mlp", "dcn"])
def test_warm_start_copies_the_members_embedding_and_first_layer_and_nothing_else(arch: str) -> None:
    spec, _ = spec_for_budget(SCHEMA, CompactOptions(flops_per_row=20_000), rows())
    torch.manual_seed(0)
    model = build_compact(spec, SCHEMA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    donor = member(arch)
    copied = warm_start(model, donor)
    after, theirs = model.state_dict(), donor.state_dict()
    embedding = [k for k in after if k.startswith("embedding.")]
    assert set(copied) == {*embedding, "bottom.blocks.0.0.weight", "bottom.blocks.0.0.bias"}
    assert all(torch.equal(after[k], theirs[k]) for k in embedding)
    first = next(m for m in donor.modules() if isinstance(m, nn.Linear) and m.in_features == after["bottom.blocks.0.0.weight"].shape[1]
                 and m.out_features <= spec.bottom[0])
    rows_copied = first.out_features
    assert torch.equal(after["bottom.blocks.0.0.weight"][:rows_copied], first.weight)
    assert torch.equal(after["bottom.blocks.0.0.weight"][rows_copied:], before["bottom.blocks.0.0.weight"][rows_copied:])
    assert torch.equal(after["bottom.blocks.0.0.bias"][:rows_copied], first.bias)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in copied)
    data = rows()
    assert torch.equal(model.embedding(data.sparse, data.dense), donor.embedding(data.sparse, data.dense))


@pytest.mark.parametrize("embed_dim, mode", [(4, "periodic"), (8, "minmax")])
def test_warm_start_from_a_member_with_another_embedding_changes_nothing(embed_dim: int, mode: str) -> None:
    spec, _ = spec_for_budget(SCHEMA, CompactOptions(flops_per_row=20_000), rows())
    model = build_compact(spec, SCHEMA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert warm_start(model, member(embed_dim=embed_dim, mode=mode)) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
