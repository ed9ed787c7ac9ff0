"""Fusion recipes (``emm.fusion.recipes``): each option's registry is the one declaration of its values, and a
new recipe is one class plus one registry entry, accepted by ``AKFOptions`` and built into a ``FusedModel``."""

from __future__ import annotations

import json

import pydantic
import pytest
import torch
from torch import Tensor, nn

from emm.errors import EMMError
from emm.fusion import FusedModel
from emm.fusion.options import AKFOptions
from emm.fusion.recipes import ATTENTIONS, ENTRIES, FUSION_GATES, OUTPUTS, FusionGate, HardGate, OutputHead
from tests.unit.test_akf import Pool, batch


@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"])


@pytest.fixture
def soft_gate():
    """A toy fusion gate: the softmax-weighted mix of every task's output (no hard selection)."""

    @FUSION_GATES.register("soft")
    class SoftGate(FusionGate):
        def other(self, H: Tensor, sel: Tensor, probs: Tensor) -> Tensor:
            return torch.einsum("bt,btw->bw", probs, H)

    yield SoftGate
    del FUSION_GATES["soft"]


class Temperature(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.full((n,), 0.5))

    def forward(self, logits: Tensor) -> Tensor:
        return logits * self.log_t.exp()


@pytest.fixture
def tempered_head():
    """A toy output head with a module of its own: the towers' logits times a learned per-task temperature."""

    @OUTPUTS.register("tempered")
    class TemperedOutput(OutputHead):
        def build(self, plan, model_tasks, task_names, towers):
            return {"temperature": Temperature(len(task_names))}

        def logits(self, model, towers, sparse, dense):
            return model.temperature(towers)

    yield TemperedOutput
    del OUTPUTS["tempered"]


def test_registries_hold_todays_values_in_order():
    assert list(OUTPUTS) == ["tower", "donor_residual", "cross_residual"]
    assert list(ENTRIES) == ["retrain", "reuse"]
    assert list(FUSION_GATES) == ["hard", "scaled", "ste"]
    assert list(ATTENTIONS) == ["task_query", "self_score"]
    schema = AKFOptions.model_json_schema()["properties"]
    assert schema["fusion_gate"]["enum"] == ["hard", "scaled", "ste"] and schema["fusion_gate"]["default"] == "scaled"
    assert schema["output"]["enum"] == ["tower", "donor_residual", "cross_residual"]


def test_options_accept_exactly_the_registry_keys():
    with pytest.raises(pydantic.ValidationError, match="Input should be 'hard', 'scaled' or 'ste'"):
        AKFOptions(fusion_gate="soft")
    with pytest.raises(pydantic.ValidationError, match="Input should be 'tower', 'donor_residual' or 'cross_residual'"):
        AKFOptions(output=1)
    assert AKFOptions(attention="self_score").model_dump(mode="json")["attention"] == "self_score"


def test_registry_lookup_and_registration_errors():
    assert isinstance(FUSION_GATES.resolve("hard"), HardGate)
    gate = HardGate()
    assert FUSION_GATES.resolve(gate) is gate
    with pytest.raises(EMMError, match="fusion_gate must be one of hard, scaled, ste, got 'soft'"):
        FUSION_GATES.resolve("soft")
    with pytest.raises(EMMError, match="already registered"):
        FUSION_GATES.register("hard")(type("Again", (FusionGate,), {}))
    with pytest.raises(TypeError, match="subclass FusionGate"):
        FUSION_GATES.register("wrong")(type("Wrong", (OutputHead,), {}))
    assert "wrong" not in FUSION_GATES


def test_a_registered_toy_gate_builds_a_fused_model(pool2, soft_gate):
    model = pool2.fused(fusion_gate="soft")
    assert all(isinstance(level.gate_recipe, soft_gate) and level.fusion_gate == "soft" for level in model.levels)
    hard = pool2.fused(fusion_gate="hard")
    assert model.state_dict().keys() == hard.state_dict().keys()  # a gate rule adds no parameters
    x = batch(32)
    model.eval()(*x).sum().backward()
    for level in model.levels:  # the mix reaches every fusion gate, unlike hard argmax
        assert all(gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0 for gate in level.fusion_gates)
    hard.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(*x), hard.eval()(*x))
    config = json.loads(json.dumps(model.config_dict()))
    assert config["options"]["fusion_gate"] == "soft"
    rebuilt = FusedModel.from_config(pool2.plan, config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(*x), model(*x))


def test_a_registered_toy_output_head_builds_a_fused_model(pool2, tempered_head):
    model = pool2.fused(output="tempered").eval()
    assert isinstance(model.output_head, tempered_head)
    assert "temperature.log_t" in model.state_dict() and model.donors is None and model.blend is None
    tower = pool2.fused(output="tower").eval()
    x = batch(16)
    with torch.no_grad():
        torch.testing.assert_close(model(*x), tower(*x) * torch.exp(torch.tensor(0.5)))
    assert model.prepare(*x, torch.zeros(16, 2)) is None  # the base head has nothing to fit
    with pytest.raises(EMMError, match="keeps no donors"):
        model.donor_logits(*x)
