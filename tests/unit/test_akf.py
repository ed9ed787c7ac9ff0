"""The AKF fusion levels and the fused multi-task model (paper III-B/C, Algorithm 2).

Pools here are the project's own single-task models (``build_model``) on a tiny fake schema, with
random weights standing in for trained ones; plans come from the real ``decompose``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emm.fusion.options import AKFOptions
from emm.data.schema import DenseFeature, Schema, SparseFeature, TaskInfo
from emm.errors import EMMError
from emm.fusion import AKFLevel, FusedModel, build_fused, decompose, load_plan, save_plan
from emm.fusion.decompose import Chain
from emm.fusion.plan_parts import embedding_only_level
from emm.models.single_task import ModelSpec, Tower, build_model
from tests.unit.test_decompose import NaNGuardChain
from tests.unit.test_decompose import example as chain_example

N_SPARSE, VOCAB, N_DENSE = 3, 5, 2
SPINE = [32, 16, 8]


def make_schema(tasks: list[str]) -> Schema:
    sparse = [SparseFeature(name=f"s{i}", vocab_size=VOCAB, offset=VOCAB * i) for i in range(N_SPARSE)]
    dense = [DenseFeature(name=f"d{i}", min=0.0, max=1.0) for i in range(N_DENSE)]
    infos = [TaskInfo(name=t, column="label", rule={}, positives={}, positive_rate={}) for t in tasks]
    return Schema(dataset="fake", sparse=sparse, dense=dense, tasks=infos, rows={}, raw_files=[], encoding={})


def batch(rows: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(N_SPARSE) * VOCAB
    return torch.randint(0, VOCAB, (rows, N_SPARSE), generator=g) + offsets, torch.rand(rows, N_DENSE, generator=g)


def pool_specs(tasks: list[str], *, batchnorm: bool = False, dropout: float = 0.1) -> list[ModelSpec]:
    """Two models per task; structures chosen so some levels hold identical components and
    some unique ones (DCN, deeper MLP), and two residual models share a non-chain structure."""
    archs = [("mlp", SPINE), ("dcn", SPINE), ("mlp", SPINE), ("resmlp", SPINE), ("resmlp", SPINE),
             ("mlp", [SPINE[0], *SPINE])]
    specs = []
    for i, task in enumerate(tasks):
        for j in range(2):
            arch, hidden = archs[(2 * i + j) % len(archs)]
            specs.append(ModelSpec(name=f"{task}-{arch}{j}", task=task, arch=arch, hidden=hidden, embed_dim=4,
                                   tower=[4], dropout=dropout, batchnorm=batchnorm))
    return specs


def pretend_trained(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and non-trivial BatchNorm statistics, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model.eval()


class Pool:
    def __init__(self, tasks: list[str], **kw) -> None:
        torch.manual_seed(0)
        self.schema = make_schema(tasks)
        self.specs = pool_specs(tasks, **kw)
        self.models = [pretend_trained(build_model(s, self.schema), i) for i, s in enumerate(self.specs)]
        self.plan = decompose(self.models, batch(16), names=[s.name for s in self.specs], head="tower")
        self.model_tasks = [s.task for s in self.specs]
        self.tasks = tasks

    def fused(self, seed: int = 0, **cfg) -> FusedModel:
        torch.manual_seed(seed)
        return build_fused(self.plan, self.model_tasks, self.tasks, AKFOptions(**cfg), self.schema)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and with a busy second core OpenMP's spin-waiting
    makes them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool2() -> Pool:
    return Pool(["a", "b"])


@pytest.fixture(scope="module")
def pool3() -> Pool:
    return Pool(["a", "b", "c"])


@pytest.fixture(scope="module")
def pool3_bn() -> Pool:
    return Pool(["a", "b", "c"], batchnorm=True, dropout=0.3)


def labels(x: tuple[Tensor, Tensor], tasks: int) -> Tensor:
    """Deterministic targets the model can fit: functions of the inputs."""
    sparse, dense = x
    cols = [((sparse[:, t % N_SPARSE] % 2) == 0).float() if t % 2 == 0 else (dense[:, t % N_DENSE] > 0.5).float()
            for t in range(tasks)]
    return torch.stack(cols, dim=1)


def train_steps(model: FusedModel, x: tuple[Tensor, Tensor], steps: int, lr: float = 1e-2) -> None:
    y = labels(x, len(model.task_names))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(*x), y).backward()
        opt.step()


def eval_loss(model: FusedModel, x: tuple[Tensor, Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(model(*x), labels(x, len(model.task_names))))


# --------------------------------------------------------------------------------------------- #
# The plan the tests fuse
# --------------------------------------------------------------------------------------------- #


def test_plan_has_embedding_level_and_mixed_structures(pool3):
    plan = pool3.plan
    assert plan.num_levels == 4
    assert embedding_only_level(plan, 0) and not embedding_only_level(plan, 1)
    assert [tuple(level.out_shape) for level in plan.levels] == [(N_SPARSE * 4 + N_DENSE,), (32,), (16,), (8,)]


# --------------------------------------------------------------------------------------------- #
# Shapes and selection
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("pool_name", ["pool2", "pool3"])
@pytest.mark.parametrize("embedding", ["retrain", "reuse"])
def test_output_shape(request, pool_name, embedding):
    pool = request.getfixturevalue(pool_name)
    model = pool.fused(embedding=embedding)
    out = model(*batch(24))
    assert out.shape == (24, len(pool.tasks)) and torch.isfinite(out).all()
    assert len(model.levels) == (3 if embedding == "retrain" else 4)


@pytest.mark.parametrize("fusion_gate", ["hard", "scaled", "ste"])
def test_a_task_never_selects_itself(pool3, fusion_gate):
    model = pool3.fused(fusion_gate=fusion_gate)
    with torch.no_grad():  # sharp, input-dependent fusion gates so that selections vary
        for level in model.levels:
            for gate in level.fusion_gates:
                gate.weight.mul_(20)
    model.eval()
    chosen: dict[tuple[int, int], set[int]] = {}
    for seed in range(8):
        with torch.no_grad():
            model(*batch(64, seed=seed))
        for level in model.levels:
            selected = level.last_gates["selected"]
            assert selected.shape == (3, 64)
            for t in range(3):
                assert (selected[t] != t).all()
                chosen.setdefault((level.index, t), set()).update(selected[t].tolist())
    # not trivially constant: some task at some level picks both others
    assert any(len(s) == 2 for s in chosen.values())


def test_hard_argmax_is_the_most_probable_other_task(pool3):
    model = pool3.fused(fusion_gate="hard")
    with torch.no_grad():
        model.eval()(*batch(128, seed=3))
    for level in model.levels:
        probs, selected = level.last_gates["fusion"], level.last_gates["selected"]
        for t in range(3):
            p = probs[t].clone()
            assert torch.allclose(p.sum(-1), torch.ones(128))
            p[:, t] = -1.0
            assert torch.equal(selected[t], p.argmax(-1))
            picked = p.gather(1, selected[t].unsqueeze(1))
            assert (picked >= p).all()


def test_two_tasks_select_each_other(pool2):
    model = pool2.fused(fusion_gate="hard")
    model(*batch(32))
    for level in model.levels:
        assert (level.last_gates["selected"][0] == 1).all() and (level.last_gates["selected"][1] == 0).all()


@pytest.mark.parametrize("pool_name", ["pool2", "pool3"])
@pytest.mark.parametrize("fusion_gate", ["hard", "scaled", "ste"])
def test_fusion_gate_gradient(request, pool_name, fusion_gate):
    pool = request.getfixturevalue(pool_name)
    model = pool.fused(fusion_gate=fusion_gate).eval()
    x = batch(32)
    F.binary_cross_entropy_with_logits(model(*x), labels(x, len(pool.tasks))).backward()
    for level in model.levels:
        for gate in level.fusion_gates:
            if fusion_gate == "hard":
                assert gate.weight.grad is None or not gate.weight.grad.any()
            else:
                assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
        for gate in level.task_gates:  # the task gates learn in every mode
            assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_ste_forward_equals_hard_forward(pool3):
    hard, ste = pool3.fused(fusion_gate="hard").eval(), pool3.fused(fusion_gate="ste").eval()
    ste.load_state_dict(hard.state_dict())
    x = batch(32)
    with torch.no_grad():
        assert torch.allclose(hard(*x), ste(*x), atol=1e-6)


@pytest.mark.parametrize("attention", ["task_query", "self_score"])
def test_attention_modes_run(pool3, attention):
    model = pool3.fused(attention=attention, qkv_dim=6)
    out = model(*batch(32))
    assert out.shape == (32, 3)
    for level in model.levels:
        c = level.last_gates["attention"]
        assert c.shape == (3, 32, 2) and torch.allclose(c.sum(-1), torch.ones(3, 32))
        assert level.merges[0].q[0].out_features == 6


def test_attention_modes_differ(pool3):
    a, b = pool3.fused(attention="task_query").eval(), pool3.fused(attention="self_score").eval()
    b.load_state_dict(a.state_dict())  # same weights, other scoring rule
    x = batch(32)
    with torch.no_grad():
        assert not torch.allclose(a(*x), b(*x))


def test_value_network_starts_as_identity():
    """At initialisation z^t is a convex mix of h^t and h^sel (V = identity on ReLU outputs)."""
    comps = [nn.Sequential(nn.Linear(4, 6), nn.ReLU()) for _ in range(2)]
    level = AKFLevel(comps, [0, 1], 2, (6,), 4, fusion_gate="hard")
    assert level.value_relu
    x = torch.randn(10, 4)
    zs = level([(x,), (x,)], [x, x])
    h = [c(x) for c in comps]
    c = level.last_gates["attention"]
    for t in range(2):
        expected = c[t, :, :1] * h[t] + c[t, :, 1:] * h[1 - t]
        assert torch.allclose(zs[t], expected, atol=1e-6)


def test_hook_read_chains_keep_the_value_relu():
    """Components of the forward-hook fallback are ``Chain``s; V keeps its ReLU when every one ends in one."""
    torch.manual_seed(0)
    plan = decompose([NaNGuardChain().eval() for _ in range(2)], chain_example())
    assert [trace.method for trace in plan.traces] == ["hooks", "hooks"]
    comps = [plan.components[i][0] for i in range(2)]
    assert all(isinstance(c, Chain) for c in comps)
    assert AKFLevel(comps, [0, 1], 2, plan.levels[0].out_shape, 4).value_relu
    linear_end = [Chain(["a", "b"], [nn.Linear(4, 6), nn.ReLU()]), Chain(["a", "b"], [nn.ReLU(), nn.Linear(4, 6)])]
    assert not AKFLevel(linear_end, [0, 1], 2, (6,), 4).value_relu
    through_dropout = [Chain(["a", "b", "c"], [nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.1)]) for _ in range(2)]
    assert AKFLevel(through_dropout, [0, 1], 2, (6,), 4).value_relu


# --------------------------------------------------------------------------------------------- #
# Frozen components and ablations
# --------------------------------------------------------------------------------------------- #


def test_frozen_components_do_not_change(pool3_bn):
    model = pool3_bn.fused(embedding="reuse")
    components = model.component_modules()
    before = [copy.deepcopy(c.state_dict()) for c in components]
    others = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(not p.requires_grad for c in components for p in c.parameters())
    assert any("running_mean" in k for state in before for k in state)

    train_steps(model, batch(64), steps=4)
    assert model.training and all(not m.training for c in components for m in c.modules())
    for c, state in zip(components, before):
        for key, value in c.state_dict().items():
            assert torch.equal(value, state[key]), key
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, others[n])]
    assert any(n.startswith("towers.") for n in changed)
    assert any(".task_gates." in n for n in changed) and any(".merges." in n for n in changed)
    assert any(".fusion_gates." in n for n in changed)


def test_frozen_components_are_the_plans(pool3):
    model = pool3.fused(ablation="full")
    for level in model.levels:
        for i, component in enumerate(level.components):
            original = pool3.plan.components[i][level.index].state_dict()
            assert all(torch.equal(v, original[k]) for k, v in component.state_dict().items())
            assert component is not pool3.plan.components[i][level.index]


@pytest.mark.parametrize("ablation", ["full", "+pretrained", "+mtm", "baseline"])
def test_ablation_builds_and_learns(pool2, ablation):
    model = pool2.fused(ablation=ablation)
    trained_parts = ablation in ("full", "+pretrained")
    mtm = ablation in ("full", "+mtm")
    for level in model.levels:
        assert (level.fusion_gates is not None) == mtm and (level.merges is not None) == mtm
        for i, component in enumerate(level.components):
            params = list(component.parameters())
            assert all(p.requires_grad != trained_parts for p in params)
            original = dict(pool2.plan.components[i][level.index].named_parameters())
            same = all(torch.equal(p, original[n]) for n, p in component.named_parameters())
            assert same == trained_parts  # +mtm / baseline: randomly re-initialised
    x = batch(128, seed=1)
    start = eval_loss(model, x)
    train_steps(model, x, steps=30, lr=2e-2)
    assert eval_loss(model, x) < start - 0.01


def test_without_mtm_the_task_output_is_the_gated_mix(pool2):
    model = pool2.fused(ablation="+pretrained").eval()
    level = model.levels[0]
    x = model.embedding(*batch(8))
    with torch.no_grad():
        zs = level([(x,), (x,)], [x, x])
        outs = level.component_outputs([(x,), (x,)])
    for t in range(2):
        w = level.last_gates["task"][t]
        expected = sum(w[:, j:j + 1] * outs[i] for j, i in enumerate(level.members[t]))
        assert torch.allclose(zs[t], expected, atol=1e-6)


# --------------------------------------------------------------------------------------------- #
# Running the components
# --------------------------------------------------------------------------------------------- #


def test_trainable_components_receive_gradients(pool3):
    """Trainable components (baseline): the loss reaches the components' own parameters."""
    model = pool3.fused(ablation="baseline", embedding="reuse").eval()  # eval: no dropout randomness
    x = batch(32)
    F.binary_cross_entropy_with_logits(model(*x), labels(x, 3)).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(".components." in n for n in grads)


def test_every_component_runs_once_per_call(pool3):
    level = pool3.fused(embedding="reuse").levels[2]
    calls = []
    for i, component in enumerate(level.components):
        component.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    inputs = [(torch.rand(8, 32),) for _ in range(3)]
    level.component_outputs(inputs)
    assert sorted(calls) == list(range(6))


def test_component_outputs_follow_weight_changes(pool3):
    """Each output is its component applied to its own task's input, with the component's current weights."""
    level = pool3.fused().levels[0]
    inputs = [(torch.rand(8, 14),) for _ in range(3)]
    with torch.no_grad():
        first = level.component_outputs(inputs)
        for component in level.components:
            for p in component.parameters():
                p.add_(0.1)
        again = level.component_outputs(inputs)
        direct = [component(*inputs[t]) for component, t in zip(level.components, level.component_tasks)]
    assert not torch.allclose(first[0], again[0])
    assert all(torch.equal(a, b) for a, b in zip(again, direct))


def test_batchnorm_in_training_mode_updates_each_component():
    """Trainable BatchNorm components update their own running stats, once per forward."""
    comps = [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()) for _ in range(2)]
    level = AKFLevel(comps, [0, 1], 2, (6,), 4, frozen=False).train()
    x = torch.randn(16, 4)
    level([(x,), (x,)], [x, x])
    assert all(int(c[1].num_batches_tracked) == 1 for c in comps)


# --------------------------------------------------------------------------------------------- #
# Embedding paths
# --------------------------------------------------------------------------------------------- #


def test_retrain_replaces_the_embedding_level(pool3):
    model = pool3.fused(embedding="retrain")
    assert model.replaces_level0 and model.first_level == 1
    assert [level.index for level in model.levels] == [1, 2, 3]
    assert all(p.requires_grad for p in model.embedding.parameters())
    assert model.levels[0].gate_dim == model.embedding.out_dim
    x = batch(16)
    model(*x).sum().backward()
    assert model.embedding.embedding.weight.grad is not None


def test_reuse_fuses_the_frozen_pool_embeddings(pool3):
    model = pool3.fused(embedding="reuse")
    assert model.embedding is None and not model.replaces_level0
    level0 = model.levels[0]
    assert level0.index == 0 and not level0.value_relu  # signed embedding outputs: linear V
    assert all(not p.requires_grad for p in level0.components.parameters())
    x = batch(16)
    model(*x).sum().backward()
    assert all(p.grad is None for p in level0.components.parameters())
    assert level0.task_gates[0].weight.grad is not None  # gated on the mean of the component outputs


class DenseProjectionModel(nn.Module):
    """A model whose first cut holds an embedding *and* a dense projection: level 0 is not embedding-only."""

    def __init__(self, total_vocab: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(total_vocab, 4)
        self.dense = nn.Linear(N_DENSE, 6)
        self.body = nn.Sequential(nn.Linear(N_SPARSE * 4 + 6, 16), nn.ReLU())
        self.tower = Tower(16, [4])

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        h = torch.cat([self.embedding(sparse).flatten(1), torch.relu(self.dense(dense))], dim=1)
        return self.tower(self.body(h))


def test_retrain_with_a_level0_that_is_not_embedding_only():
    schema = make_schema(["a", "b"])
    torch.manual_seed(0)
    models = [DenseProjectionModel(schema.total_vocab).eval() for _ in range(3)]
    plan = decompose(models, batch(8), head="tower")
    assert plan.num_levels == 2 and not embedding_only_level(plan, 0)
    model = build_fused(plan, ["a", "a", "b"], ["a", "b"], AKFOptions(), schema)
    assert not model.replaces_level0 and model.levels[0].index == 0
    assert model.levels[0].gate_dim == model.embedding.out_dim  # the fresh embedding is the gate input
    out = model(*batch(8))
    assert out.shape == (8, 2)
    out.sum().backward()
    assert model.embedding.embedding.weight.grad is not None


# --------------------------------------------------------------------------------------------- #
# Saving and rebuilding; reports; errors
# --------------------------------------------------------------------------------------------- #


@pytest.mark.parametrize("embedding", ["retrain", "reuse"])
def test_state_dict_round_trip(pool3_bn, tmp_path, embedding):
    model = pool3_bn.fused(embedding=embedding, fusion_gate="ste", attention="self_score")
    train_steps(model, batch(32), steps=2)
    config = json.loads(json.dumps(model.config_dict()))
    save_plan(pool3_bn.plan, tmp_path / "plan", tasks=pool3_bn.model_tasks)
    torch.save(model.state_dict(), tmp_path / "fused.pt")

    torch.manual_seed(123)  # fresh models: other weights; only their structure is used
    fresh = [build_model(s, pool3_bn.schema) for s in pool3_bn.specs]
    plan = load_plan(tmp_path / "plan", fresh, batch(16))
    rebuilt = FusedModel.from_config(plan, config)
    rebuilt.load_state_dict(torch.load(tmp_path / "fused.pt", weights_only=True), strict=True)
    x = batch(40, seed=9)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(*x), rebuilt(*x))


def test_config_dict_names_everything(pool2):
    config = pool2.fused(ablation="+mtm", qkv_dim=4).config_dict()
    assert config["task_names"] == ["a", "b"] and config["model_tasks"] == pool2.model_tasks
    assert config["options"]["ablation"] == "+mtm" and config["options"]["qkv_dim"] == 4
    assert "train" not in config["options"]  # the architecture record holds no training settings
    assert config["embedding"] == {"total_vocab": N_SPARSE * VOCAB, "n_sparse": N_SPARSE, "n_dense": N_DENSE, "dim": 4}
    with pytest.raises(EMMError, match="pool models"):
        FusedModel.from_config(pool2.plan, {**config, "plan_models": ["x", "y", "z", "w"]})


def test_gate_report(pool3):
    model = pool3.fused()
    assert model.gate_report() == []
    model(*batch(50))
    report = model.gate_report()
    assert [entry["level"] for entry in report] == [1, 2, 3]
    for entry in report:
        for task, info in entry["tasks"].items():
            assert set(info["task_gate"]) == {s.name for s in pool3.specs if s.task == task}
            assert sum(info["task_gate"].values()) == pytest.approx(1.0, abs=1e-5)
            assert task not in info["selection"] and sum(info["selection"].values()) == pytest.approx(1.0)
            assert 0.0 <= info["attention_own"] <= 1.0
    json.dumps(report)
    matrix = model.selection_matrix()
    assert matrix.shape == (3, 3) and torch.equal(matrix.diagonal(), torch.zeros(3))
    assert torch.allclose(matrix.sum(1), torch.ones(3))


def test_user_errors(pool2):
    plan, cfg = pool2.plan, AKFOptions()
    with pytest.raises(EMMError, match="model tasks"):
        FusedModel(plan, ["a"], ["a", "b"], cfg)
    with pytest.raises(EMMError, match="no model in the pool"):
        FusedModel(plan, ["a"] * 4, ["a", "b"], cfg)
    with pytest.raises(EMMError, match="not in task_names"):
        FusedModel(plan, ["a", "a", "b", "x"], ["a", "b"], cfg)
    with pytest.raises(EMMError, match="at least two tasks"):
        FusedModel(plan, ["a"] * 4, ["a"], cfg)
    FusedModel(plan, ["a"] * 4, ["a"], AKFOptions(ablation="+pretrained"))  # one task without MTM is fine
    with pytest.raises(EMMError, match="reuse"):
        FusedModel(plan, pool2.model_tasks, ["a", "b"], AKFOptions(embedding="reuse"),
                   embedding=pool2.fused().embedding)
    other = make_schema(["a", "b"]).model_copy(update={"dense": []})
    with pytest.raises(EMMError, match="dense features"):
        build_fused(plan, pool2.model_tasks, ["a", "b"], cfg, other)


def test_project_aligned_plan_fuses():
    """align="project" plans: each component is wrapped by its (trainable) adapters."""
    schema = make_schema(["a", "b"])
    torch.manual_seed(0)
    specs = [ModelSpec(name=f"m{i}", task=t, arch="mlp", hidden=h, embed_dim=4, tower=[4])
             for i, (t, h) in enumerate([("a", [32, 16]), ("a", [24, 8]), ("b", [32, 16])])]
    plan = decompose([build_model(s, schema).eval() for s in specs], batch(8), head="tower", align="project")
    model = build_fused(plan, ["a", "a", "b"], ["a", "b"], AKFOptions(), schema)
    x = batch(16)
    assert model(*x).shape == (16, 2)
    train_steps(model, x, steps=1)
    assert all(p.requires_grad for level in model.levels for p in level.post.parameters())
