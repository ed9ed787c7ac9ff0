"""Algorithm 1 (decomposition): cuts are valid, aligned across models, and exact.

The models here are test-only stand-ins for the project's models: (sparse, dense) -> logits [B, 1].
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from emm.errors import EMMError
from emm.fusion import decompose, trace_model
from emm.fusion.decompose import Chain

VOCAB, DIM, N_SPARSE, N_DENSE, BATCH = 40, 4, 3, 2, 7
EMB_OUT = N_SPARSE * DIM + N_DENSE  # 14


def example(batch: int = BATCH, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, N_SPARSE), generator=g), torch.randn(batch, N_DENSE, generator=g)


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Stand-in for training: random weights *and* non-trivial BatchNorm running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class FeatureEmbedding(nn.Module):
    def __init__(self, dim: int = DIM, vocab: int = VOCAB) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, dim)
        self.out_dim = N_SPARSE * dim + N_DENSE

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return torch.cat([self.table(sparse).flatten(1), dense], dim=1)


def mlp_blocks(d: int, widths: list[int], bn: bool = False, dropout: float = 0.0) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for w in widths:
        layers.append(nn.Linear(d, w))
        if bn:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = w
    return nn.Sequential(*layers), d


class MLPModel(nn.Module):
    def __init__(self, widths: list[int], *, bn: bool = False, dropout: float = 0.0, dim: int = DIM,
                 vocab: int = VOCAB, tower_hidden: int | None = None) -> None:
        super().__init__()
        self.features = FeatureEmbedding(dim, vocab)
        self.body, d = mlp_blocks(self.features.out_dim, widths, bn, dropout)
        tower: list[nn.Module] = [nn.Linear(d, tower_hidden), nn.ReLU()] if tower_hidden else []
        self.tower = nn.Sequential(*tower, nn.Linear(tower_hidden or d, 1))

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return self.tower(self.body(self.features(sparse, dense)))


class DCNModel(nn.Module):
    """DCN-v2: x_{l+1} = x0 * (W x_l + b) + x_l, then an MLP."""

    def __init__(self, n_cross: int = 3, widths: tuple[int, ...] = (16, 8)) -> None:
        super().__init__()
        self.features = FeatureEmbedding()
        d = self.features.out_dim
        self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(n_cross))
        self.deep, h = mlp_blocks(d, list(widths))
        self.tower = nn.Linear(h, 1)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        x0 = self.features(sparse, dense)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.tower(self.deep(x))


class ResidualBlock(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x + self.lin2(torch.relu(self.lin1(x))))


class ResidualMLP(nn.Module):
    def __init__(self, h: int = 16, n_blocks: int = 2) -> None:
        super().__init__()
        self.features = FeatureEmbedding()
        self.inp = nn.Linear(self.features.out_dim, h)
        self.blocks = nn.Sequential(*(ResidualBlock(h) for _ in range(n_blocks)))
        self.tower = nn.Linear(h, 1)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return self.tower(self.blocks(torch.relu(self.inp(self.features(sparse, dense)))))


class DenseReuseModel(nn.Module):
    """The tower reads the raw dense input again: no cut is valid before it is consumed."""

    def __init__(self) -> None:
        super().__init__()
        self.features = FeatureEmbedding()
        self.body, d = mlp_blocks(self.features.out_dim, [16, 8])
        self.tower = nn.Linear(d + N_DENSE, 1)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return self.tower(torch.cat([self.body(self.features(sparse, dense)), dense], dim=1))


class WideDeepModel(nn.Module):
    """A wide part reads the dense input at the very end: no cut is valid anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.features = FeatureEmbedding()
        self.body, d = mlp_blocks(self.features.out_dim, [16, 8])
        self.tower, self.wide = nn.Linear(d, 1), nn.Linear(N_DENSE, 1)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return self.tower(self.body(self.features(sparse, dense))) + self.wide(dense)


class SharedParamModel(nn.Module):
    """A functional parameter used on both sides of cuts, a module called twice, a defaulted argument."""

    def __init__(self) -> None:
        super().__init__()
        self.features = FeatureEmbedding()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.inp, self.shared, self.tower = nn.Linear(EMB_OUT, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, sparse: Tensor, dense: Tensor, temperature: float = 2.0) -> Tensor:
        h = torch.relu(self.inp(self.features(sparse, dense) * self.scale))
        h = torch.relu(self.shared(torch.relu(self.shared(h))))
        return self.tower(h) * self.scale.exp() / temperature


class PickDense(nn.Module):
    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return dense


class NaNGuardChain(nn.Module):
    """Leaves run as a chain, but the forward has a data-dependent check fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.pick = PickDense()
        self.body = nn.Sequential(nn.Linear(N_DENSE, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        out = self.body(self.pick(sparse, dense))
        if torch.isnan(out).any():
            raise ValueError("nan")
        return out


class SignFlip(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow inside a sub-module
            return -x
        return x


class OpaqueSubmoduleModel(MLPModel):
    def __init__(self) -> None:
        super().__init__([16, 8])
        self.body.insert(2, SignFlip())


class BranchyModel(nn.Module):
    """Data-dependent control flow in the model's own forward and no chain of leaves: undecomposable."""

    def __init__(self) -> None:
        super().__init__()
        self.features = FeatureEmbedding()
        self.a, self.b = nn.Linear(EMB_OUT, 8), nn.Linear(EMB_OUT, 8)
        self.tower = nn.Linear(8, 1)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        x = self.features(sparse, dense)
        h = self.a(x) if dense.sum() > 0 else self.b(x)
        return self.tower(h)


def assert_plan_exact(plan, models, inputs) -> None:
    """Components chain exactly, shapes agree per level across models, nothing shares parameters."""
    for i, model in enumerate(models):
        with torch.no_grad():
            assert torch.equal(plan.forward_model(i, *inputs), model.eval()(*inputs))
            h = plan.components[i][0](*inputs)
            for k, level in enumerate(plan.levels):
                if k:
                    h = plan.components[i][k](h)
                assert tuple(h.shape[1:]) == level.spans[i].out_shape
                if plan.align == "identical":
                    assert tuple(h.shape[1:]) == level.out_shape
    model_ptrs = {p.data_ptr() for m in models for p in m.parameters()}
    seen: set[int] = set()
    for pieces, head in zip(plan.components, plan.heads):
        for piece in [*pieces, head]:
            ptrs = {p.data_ptr() for p in piece.parameters()}
            assert not ptrs & model_ptrs and not ptrs & seen
            seen |= ptrs


# --------------------------------------------------------------------------------------------- #
# The paper's setting
# --------------------------------------------------------------------------------------------- #


def test_paper_setting_two_mlps_with_identical_hidden_sizes():
    models = [trained(MLPModel([16, 8]), seed=1), trained(MLPModel([16, 8], bn=True, dropout=0.2), seed=2)]
    x = example()
    plan = decompose(models, x, names=["ctr", "cvr"])
    assert plan.num_levels == 3  # embedding, hidden 16, hidden 8; the tower is the head
    assert [lv.out_shape for lv in plan.levels] == [(EMB_OUT,), (16,), (8,)]
    assert [lv.in_shapes for lv in plan.levels] == [((N_SPARSE,), (N_DENSE,)), ((EMB_OUT,),), ((16,),)]
    assert [lv.signature.type for lv in plan.levels] == ["Embedding", "Linear", "Linear"]
    assert plan.levels[1].signature.hparams == "in_features=14, out_features=16, bias=True"
    # the BN model's block is Linear+BN+ReLU+Dropout in one component: BN is never a cut point
    assert plan.levels[1].spans[1].layers == ("body.0", "body.1", "body.2", "body.3")
    assert plan.levels[1].spans[0].layers == ("body.0", "body.1")
    assert [s.layers for s in plan.head_spans] == [("tower.0",), ("tower.0",)]
    assert_plan_exact(plan, models, x)


def test_common_layer_at_a_different_index():
    models = [trained(MLPModel([16, 8]), 1), trained(MLPModel([32, 16, 8], tower_hidden=4), 2)]
    x = example()
    plan = decompose(models, x)
    assert plan.num_levels == 2
    last = plan.levels[1]
    assert last.signature.hparams == "in_features=16, out_features=8, bias=True"
    assert last.spans[0].cut_layer == "body.2" and last.spans[1].cut_layer == "body.4"
    # the unmatched Linear(14,32) and Linear(32,16) stay inside model 1's level-1 component
    assert last.spans[1].layers[:4] == ("body.0", "body.1", "body.2", "body.3")
    assert plan.head_spans[1].layers == ("tower.0", "tower.1", "tower.2")
    assert_plan_exact(plan, models, x)


@settings(max_examples=8, deadline=None)
@given(
    widths=st.lists(st.lists(st.sampled_from([4, 8, 16]), min_size=1, max_size=3), min_size=2, max_size=3),
    bn=st.lists(st.booleans(), min_size=3, max_size=3),
    dropout=st.sampled_from([0.0, 0.3]),
    batch=st.integers(2, 5),
)
def test_exactness_property_random_mlps(widths, bn, dropout, batch):
    models = [trained(MLPModel(w, bn=b, dropout=dropout), seed=i) for i, (w, b) in enumerate(zip(widths, bn))]
    x = example(batch)
    plan = decompose(models, x)
    assert plan.num_levels >= 1 and plan.levels[0].signature.type == "Embedding"
    assert_plan_exact(plan, models, x)


@pytest.mark.parametrize(
    "build",
    [
        lambda: MLPModel([16, 8], bn=True, dropout=0.5),
        lambda: MLPModel([8]),
        lambda: DCNModel(),
        lambda: ResidualMLP(),
        lambda: DenseReuseModel(),
        lambda: OpaqueSubmoduleModel(),
        lambda: NaNGuardChain(),
        lambda: SharedParamModel(),
    ],
    ids=["bn-dropout", "one-hidden", "dcn", "residual", "dense-reuse", "opaque-submodule", "hook-fallback",
         "shared-param"],
)
def test_exact_for_varied_architectures(build):
    model = trained(build(), seed=3)
    x = example()
    plan = decompose([model], x)
    assert plan.num_levels == len(plan.traces[0].cut_valid())  # one model: cut at all its cut points
    assert_plan_exact(plan, [model], x)


def test_dcn_cross_network_is_not_cut_while_x0_is_live():
    model = trained(DCNModel(n_cross=3), 1)
    layers = {layer.name: layer for layer in trace_model(model, example()).layers}
    assert layers["cross.0"].cut_shape is None and layers["cross.1"].cut_shape is None
    assert "still needed" in layers["cross.0"].no_cut
    assert layers["cross.2"].cut_shape == (EMB_OUT,)  # x0 is dead after the last cross layer
    # mixed pool: DCN and MLP share the embedding and the deep part
    models = [model, trained(MLPModel([16, 8]), 2)]
    plan = decompose(models, example())
    assert [lv.out_shape for lv in plan.levels] == [(EMB_OUT,), (16,), (8,)]
    # the cross network has no counterpart in the MLP: it stays inside the DCN's level-1 component
    assert plan.levels[1].spans[0].layers[:4] == ("cross.0", "cross.1", "cross.2", "deep.0")
    assert_plan_exact(plan, models, example())


def test_residual_block_is_one_piece():
    layers = {layer.name: layer for layer in trace_model(trained(ResidualMLP()), example()).layers}
    assert layers["blocks.0.lin1"].cut_shape is None
    assert layers["blocks.0.lin2"].cut_shape == (16,)
    assert layers["blocks.1.lin2"].cut_shape == (16,)  # the tower, not the last block, is the head
    assert layers["tower"].no_cut == "last layer: belongs to the head"


def test_reused_input_invalidates_earlier_cuts():
    layers = {layer.name: layer for layer in trace_model(trained(DenseReuseModel()), example()).layers}
    assert layers["features.table"].cut_shape is None and layers["body.0"].cut_shape is None
    assert "input 'dense'" in layers["body.0"].no_cut
    assert layers["body.2"].cut_shape == (8 + N_DENSE,)  # after cat([h, dense]) one tensor is live again
    assert all(layer.cut_shape is None for layer in trace_model(WideDeepModel(), example()).layers)


def test_hook_fallback_and_opaque_submodule():
    chain = trace_model(trained(NaNGuardChain()), example())
    assert chain.method == "hooks"
    assert [layer.name for layer in chain.cut_valid()] == ["body.0", "body.2"]
    opaque = trace_model(trained(OpaqueSubmoduleModel()), example())
    assert opaque.method == "fx" and opaque.opaque == ["body.2"]


def test_hook_fallback_pieces_are_public_chains():
    """Consumers (AKF) recognise hook-read components by type, so every piece must be a ``Chain``."""
    model = trained(NaNGuardChain())
    plan = decompose([model], example())
    assert plan.traces[0].method == "hooks"
    assert all(isinstance(piece, Chain) for piece in [*plan.components[0], plan.heads[0]])
    assert_plan_exact(plan, [model], example())


def test_models_keep_their_training_flags():
    model = MLPModel([16, 8], bn=True).train()
    model.body[1].eval()
    decompose([model, MLPModel([16, 8])], example())
    assert model.training and not model.body[1].training and model.body[0].training


def test_plan_dict_is_json_and_report_is_readable():
    plan = decompose([trained(MLPModel([16, 8])), trained(MLPModel([16, 8], bn=True))], example(), names=["a", "b"])
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["num_levels"] == 3 and data["models"] == ["a", "b"]
    assert data["levels"][2]["models"][1]["num_params"] == 16 * 8 + 8 + 2 * 8
    report = plan.report()
    assert "Linear(in_features=16, out_features=8, bias=True) [16]->[8]" in report
    assert "head" in report and "body.0 .. body.2 (3)" in report


def test_components_can_be_frozen_independently():
    model = trained(MLPModel([16, 8]))
    plan = decompose([model], example())
    for p in plan.components[0][0].parameters():
        p.requires_grad_(False)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in plan.components[0][1].parameters())


# --------------------------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------------------------- #


def test_no_common_layer_lists_every_models_signatures():
    models = [MLPModel([16, 8], dim=4), MLPModel([12, 6], dim=6)]
    with pytest.raises(EMMError) as err:
        decompose(models, example(), names=["small", "wide"])
    msg = str(err.value)
    assert "no identical layer" in msg and "small (MLPModel)" in msg and "wide (MLPModel)" in msg
    assert "Embedding(40, 4)" in msg and "Embedding(40, 6)" in msg
    assert "Linear(in_features=20, out_features=12, bias=True)" in msg
    assert "align='project'" in msg


def test_model_without_cut_point_is_named_in_no_common_error():
    with pytest.raises(EMMError, match=r"(?s)wide_deep \(WideDeepModel\):\n\s+\(no valid cut point\)"):
        decompose([MLPModel([8]), WideDeepModel()], example(), names=["mlp", "wide_deep"])


@pytest.mark.parametrize(
    "inputs, pattern",
    [
        ((example()[0],), r"model 'bad' \(MLPModel\) failed on example_input \(int64\[7, 3\]\): TypeError"),
        ((example()[0], torch.randn(BATCH, 5)), r"model 'bad' \(MLPModel\) failed on example_input"),
        ((example()[0], torch.randn(BATCH + 1, 2)), r"share a non-zero batch dimension"),
        (("sparse", "dense"), r"only tensors"),
    ],
)
def test_wrong_example_input_names_the_model(inputs, pattern):
    with pytest.raises(EMMError, match=pattern):
        decompose([MLPModel([8]), MLPModel([8])], inputs, names=["bad", "other"])


def test_non_batch_output_is_rejected():
    class Mean(MLPModel):
        def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
            return super().forward(sparse, dense).mean()

    with pytest.raises(EMMError, match=r"model 'm' \(Mean\) returned \[\] for a batch of 7 rows"):
        decompose([Mean([8])], example(), names=["m"])


def test_untraceable_model_names_model_and_module():
    with pytest.raises(EMMError) as err:
        decompose([MLPModel([8]), BranchyModel()], example(), names=["mlp", "branchy"])
    msg = str(err.value)
    assert "model 'branchy' (BranchyModel) cannot be decomposed" in msg
    assert "the forward of BranchyModel" in msg and "control flow" in msg
    assert "forward-hook fallback does not apply (leaf 'features.table': it does not receive" in msg


def test_bad_arguments():
    with pytest.raises(EMMError, match="align must be one of"):
        decompose([MLPModel([8])], example(), align="fuzzy")
    with pytest.raises(EMMError, match="one name per model"):
        decompose([MLPModel([8])], example(), names=["a", "b"])
    with pytest.raises(EMMError, match="at least one trained model"):
        decompose([], example())
    with pytest.raises(EMMError, match="levels= only applies"):
        decompose([MLPModel([8])], example(), levels=2)


# --------------------------------------------------------------------------------------------- #
# align="project"
# --------------------------------------------------------------------------------------------- #


def test_project_builds_adapters_for_models_without_identical_layers():
    models = [trained(MLPModel([16, 8], dim=4), 1), trained(MLPModel([12, 6, 6], dim=6), 2)]
    x = example()
    plan = decompose(models, x, names=["a", "b"], align="project")
    # a: cuts hand on 14, 16, 8; b: 20, 12, 6, 6 -> 3 levels at equal relative depth
    assert plan.num_levels == 3
    assert [lv.target_width for lv in plan.levels] == [20, 16, 8]
    assert [lv.spans[1].out_shape for lv in plan.levels] == [(20,), (6,), (6,)]
    shapes = [[(a.in_features, a.out_features) for a in per_model] for per_model in plan.adapters]
    assert shapes == [[(14, 20), (16, 16), (8, 8)], [(20, 20), (6, 16), (6, 8)]]
    back = [[(a.in_features, a.out_features) for a in per_model] for per_model in plan.inverse_adapters]
    assert back == [[(20, 14), (16, 16), (8, 8)], [(20, 20), (16, 6), (8, 6)]]
    assert all(p.requires_grad for p in plan.adapters.parameters())
    assert_plan_exact(plan, models, x)  # without adapters components chain exactly
    for i, model in enumerate(models):  # adapters start as pad/truncate: the round trip is exact too
        with torch.no_grad():
            h = plan.components[i][0](*x)
            for k in range(plan.num_levels):
                h = h if k == 0 else plan.components[i][k](h)
                common = plan.adapt(i, k, h)
                assert common.shape[1:] == (plan.levels[k].target_width,)
                h = plan.unadapt(i, k, common)
            assert torch.equal(plan.heads[i](h), model(*x))
    assert "(projected)" in plan.report()


def test_project_levels_argument():
    models = [MLPModel([16, 8], dim=4), MLPModel([12, 6, 6], dim=6)]
    assert decompose(models, example(), align="project", levels=2).num_levels == 2
    with pytest.raises(EMMError, match=r"levels=5 but model\(s\) model0, model1 have only 3"):
        decompose(models, example(), align="project", levels=5)
    with pytest.raises(EMMError, match="model1 has none"):
        decompose([MLPModel([8]), WideDeepModel()], example(), align="project")
