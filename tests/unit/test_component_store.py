"""Plan storage: JSON + safetensors round trip, no pickle, and clear errors on architecture mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from emm.errors import EMMError
from emm.fusion import decompose, load_plan, save_plan
from emm.fusion.store import _dedupe_state, load_module, save_module
from tests.unit.test_decompose import (
    EMB_OUT,
    FeatureEmbedding,
    MLPModel,
    NaNGuardChain,
    ResidualMLP,
    example,
    trained,
)


def pool(seed: int = 0) -> list[nn.Module]:
    return [trained(MLPModel([16, 8]), seed), trained(MLPModel([32, 16, 8], bn=True, dropout=0.1), seed + 1)]


def fresh_pool() -> list[nn.Module]:
    return [MLPModel([16, 8]), MLPModel([32, 16, 8], bn=True, dropout=0.1)]


def outputs(plan, x) -> list[Tensor]:
    with torch.no_grad():
        return [plan.forward_model(i, *x) for i in range(plan.num_models)]


def test_round_trip_gives_identical_outputs(tmp_path: Path):
    models, x = pool(), example()
    plan = decompose(models, x, names=["ctr", "cvr"])
    folder = save_plan(plan, tmp_path / "plan", tasks=["click", "conversion"])
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["manifest.json", "model0.head.safetensors", "model0.level0.safetensors",
                     "model0.level1.safetensors", "model1.head.safetensors", "model1.level0.safetensors",
                     "model1.level1.safetensors", "plan.json"]
    loaded = load_plan(folder, fresh_pool(), x)
    assert loaded.to_dict() == plan.to_dict()
    for model, before, after in zip(models, outputs(plan, x), outputs(loaded, x)):
        assert torch.equal(before, after) and torch.equal(after, model(*x))
    x2 = example(batch=5, seed=9)  # and on another batch
    assert all(torch.equal(a, b) for a, b in zip(outputs(plan, x2), outputs(loaded, x2)))


def test_manifest_lists_every_component(tmp_path: Path):
    plan = decompose(pool(), example(), names=["ctr", "cvr"])
    folder = save_plan(plan, tmp_path / "p", model_names=["CTR model", "CVR model"], tasks=["click", "conversion"])
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = {(e["model_index"], e["level"]): e for e in manifest["entries"]}
    assert set(entries) == {(0, 0), (0, 1), (0, "head"), (1, 0), (1, 1), (1, "head")}
    e = entries[(1, 1)]
    assert (e["model"], e["task"], e["file"]) == ("CVR model", "conversion", "model1.level1.safetensors")
    assert (e["in_shapes"], e["out_shape"]) == ([[EMB_OUT]], [8])
    assert e["num_params"] == plan.levels[1].spans[1].num_params > 0
    assert json.loads((folder / "plan.json").read_text()) == plan.to_dict()


def test_other_architecture_is_refused_with_the_layer_named(tmp_path: Path):
    x = example()
    folder = save_plan(decompose(pool(), x, names=["ctr", "cvr"]), tmp_path / "p", tasks=["a", "b"])
    wrong = [MLPModel([16, 8]), MLPModel([32, 12, 8], bn=True, dropout=0.1)]
    with pytest.raises(EMMError, match=r"model 'cvr': layer 3 is 'body.4' Linear\(in_features=32, out_features=16"):
        load_plan(folder, wrong, x)
    grown = r"model 'ctr': layer 0 is 'features.table' Embedding\(40, 4\).*Embedding\(41, 4\)"
    with pytest.raises(EMMError, match=grown):
        load_plan(folder, [MLPModel([16, 8], vocab=41), fresh_pool()[1]], x)  # data schema grew a category
    with pytest.raises(EMMError, match=r"model 'ctr': .* saved from a MLPModel, the given model is a ResidualMLP"):
        load_plan(folder, [ResidualMLP(), fresh_pool()[1]], x)
    with pytest.raises(EMMError, match=r"holds 2 models \(ctr, cvr\) but 1 were given"):
        load_plan(folder, [MLPModel([16, 8])], x)
    with pytest.raises(EMMError, match=r"example_input has per-row shapes \[\[3\], \[5\]\]"):
        load_plan(folder, fresh_pool(), (x[0], torch.randn(7, 5)))


def test_missing_or_corrupt_files_are_named(tmp_path: Path):
    x = example()
    folder = save_plan(decompose(pool(), x), tmp_path / "p", tasks=["a", "b"])
    (folder / "model1.level0.safetensors").unlink()
    with pytest.raises(EMMError, match=r"model1\.level0\.safetensors is missing"):
        load_plan(folder, fresh_pool(), x)
    (folder / "model1.level0.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EMMError, match=r"cannot read weights file .*model1\.level0\.safetensors"):
        load_plan(folder, fresh_pool(), x)
    with pytest.raises(EMMError, match=r"plan\.json is missing"):
        load_plan(tmp_path / "nowhere", fresh_pool(), x)


def test_load_module_is_strict_and_names_file_and_key(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)}, str(path))
    load_module(nn.Linear(4, 3), path)
    with pytest.raises(EMMError, match=r"w\.safetensors: key 'weight' has shape \[3, 4\], the component expects \[5"):
        load_module(nn.Linear(4, 5), path)
    with pytest.raises(EMMError, match=r"w\.safetensors lacks key 'bias'"):
        save_file({"weight": torch.zeros(3, 4)}, str(path))
        load_module(nn.Linear(4, 3), path)
    with pytest.raises(EMMError, match=r"w\.safetensors has key 'extra'"):
        save_file({"weight": torch.zeros(3, 4), "bias": torch.zeros(3), "extra": torch.zeros(1)}, str(path))
        load_module(nn.Linear(4, 3), path)


class TiedBlock(nn.Module):
    """Two Linear layers sharing one weight, inside one component."""

    def __init__(self) -> None:
        super().__init__()
        self.features = FeatureEmbedding()
        self.inp = nn.Linear(EMB_OUT, 8)
        self.lin1, self.lin2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.lin2.weight = self.lin1.weight
        self.tower = nn.Linear(8, 1)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        h = torch.relu(self.inp(self.features(sparse, dense)))
        h = torch.relu(h + self.lin2(torch.relu(self.lin1(h))))  # residual: lin1/lin2 stay together
        return self.tower(h)


def test_tied_and_non_contiguous_tensors(tmp_path: Path):
    module = nn.Module()
    module.a = nn.Linear(4, 4)
    module.b = nn.Linear(4, 4)
    module.b.weight = module.a.weight
    module.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous view
    tensors, aliases = _dedupe_state(module.state_dict())
    assert aliases == {"b.weight": "a.weight"} and tensors["t"].is_contiguous()
    save_module(module, tmp_path / "m.safetensors")
    other = nn.Module()
    other.a, other.b = nn.Linear(4, 4), nn.Linear(4, 4)
    other.register_buffer("t", torch.zeros(4, 3))
    load_module(other, tmp_path / "m.safetensors")
    assert torch.equal(other.b.weight, module.a.weight) and torch.equal(other.t, module.t)

    x = example()
    model = trained(TiedBlock(), 4)
    plan = decompose([model], x)
    piece = plan.components[0][-1]  # levels: embedding, inp, residual block
    assert piece.lin1.weight is piece.lin2.weight  # the tie survives inside the component
    folder = save_plan(plan, tmp_path / "p", tasks=["t"])
    loaded = load_plan(folder, [TiedBlock()], x)
    assert torch.equal(outputs(loaded, x)[0], model(*x))


def test_project_plan_round_trip_keeps_adapters(tmp_path: Path):
    x = example()
    models = [trained(MLPModel([16, 8], dim=4), 1), trained(MLPModel([12, 6, 6], dim=6), 2)]
    plan = decompose(models, x, align="project")
    with torch.no_grad():  # pretend fusion trained the adapters
        for p in plan.adapters.parameters():
            p.add_(0.25)
    folder = save_plan(plan, tmp_path / "p", tasks=["a", "b"])
    assert (folder / "adapters.safetensors").is_file()
    loaded = load_plan(folder, [MLPModel([16, 8], dim=4), MLPModel([12, 6, 6], dim=6)], x)
    assert loaded.num_levels == plan.num_levels == 3
    for a, b in zip(plan.adapters.parameters(), loaded.adapters.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(outputs(plan, x), outputs(loaded, x)))


def test_hook_fallback_plan_round_trip(tmp_path: Path):
    x = example()
    model = trained(NaNGuardChain(), 5)
    plan = decompose([model], x)
    assert plan.traces[0].method == "hooks"
    loaded = load_plan(save_plan(plan, tmp_path / "p", tasks=["t"]), [NaNGuardChain()], x)
    assert torch.equal(outputs(loaded, x)[0], model(*x))


def test_save_plan_checks_labels(tmp_path: Path):
    plan = decompose(pool(), example())
    with pytest.raises(EMMError, match="save_plan got 1 tasks for a plan of 2 models"):
        save_plan(plan, tmp_path / "p", tasks=["only one"])
