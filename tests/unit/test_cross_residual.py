"""The cross-task output head (``output="cross_residual"``, issue 24) and every donor stack's handling of missing
labels: each task's blend may use every donor, is fitted on that task's labelled held-out rows only (NaN = no
label), and a task it cannot be fitted for is refused by name."""

from __future__ import annotations

import json

import numpy as np
import pydantic
import pytest
import torch
from sklearn.metrics import roc_auc_score

from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.fusion.blend import DonorBlend, fit_stack
from emm.fusion.options import AKFOptions, DecomposeConfig, FuseOptions
from emm.fusion.procedure import Frozen, FusePlan, FuseRunner
from emm.fusion.recipes import OUTPUTS, CrossResidualOutput, DonorResidualOutput
from emm.fusion.saved import architecture, build_from_config
from emm.pipeline.params import FuseConfig
from emm.train.options import TrainConfig
from emm.weights import load_module, save_module
from tests.unit.test_akf import Pool, batch

NAN = float("nan")


@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"])


def donor_logits(pool: Pool, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([m(sparse, dense) for m in pool.models], dim=1)


def scarce_rows(pool: Pool, n: int = 1200, kept: float = 0.3, seed: int = 11) -> SplitTensors:
    """Both tasks labelled by a noisy threshold of a's *second* donor (a's first is near constant on this toy
    pool), ``a`` on every row, ``b`` on a fraction ``kept`` of the rows (NaN elsewhere): b's own donors do not
    predict b."""
    sparse, dense = batch(n, seed=seed)
    donor = donor_logits(pool, sparse, dense)[:, 1]
    gen = torch.Generator().manual_seed(seed + 1)
    noisy = donor[:, None] + 0.2 * donor.std() * torch.randn(n, 2, generator=gen)
    labels = (noisy > noisy.median(0).values).float()
    labels[torch.rand(n, generator=gen) >= kept, 1] = NAN
    return SplitTensors(sparse, dense, labels, ["a", "b"])


# ---- the head and its blend ---------------------------------------------------------------------------------------
def test_cross_residual_is_registered_and_accepted_by_the_options():
    assert OUTPUTS["cross_residual"] is CrossResidualOutput and issubclass(CrossResidualOutput, DonorResidualOutput)
    assert AKFOptions(output="cross_residual").output == "cross_residual"
    assert FuseConfig.model_validate({"output": "cross_residual"}).akf.output == "cross_residual"
    assert "cross_residual" in AKFOptions.model_json_schema()["properties"]["output"]["enum"]
    with pytest.raises(pydantic.ValidationError, match="'cross_residual'"):
        AKFOptions(output="cross")
    plan = FusePlan.from_options(FuseOptions(output="cross_residual"))
    assert plan.prepare and plan.phases == (Frozen(score_start=True),)  # it starts as a model worth keeping
    assert not FusePlan.from_options(FuseOptions(output="cross_residual", blend_init="mean")).prepare


def test_cross_blend_mask_is_full_and_starts_as_each_tasks_own_mean(pool2):
    own, cross = DonorBlend(pool2.model_tasks, ["a", "b"]), DonorBlend(pool2.model_tasks, ["a", "b"], cross=True)
    assert torch.equal(cross.mask, torch.ones(2, 4))
    assert torch.equal(own.mask, torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))
    assert set(cross.state_dict()) == set(own.state_dict()) == {"weight", "bias", "mask"}
    assert cross.members(1) == [0, 1, 2, 3] and own.members(1) == [2, 3]
    sparse, dense = batch(64, seed=2)
    donors_model = pool2.fused(output="donor_residual").eval()
    cross_model = pool2.fused(output="cross_residual").eval()
    assert torch.equal(cross_model.blend.mask, torch.ones(2, 4))
    with torch.no_grad():  # unfitted (blend_init: mean): the same model as donor_residual's start
        torch.testing.assert_close(cross_model(sparse, dense), donors_model(sparse, dense))


def test_step0_is_the_fitted_cross_stack_and_the_scarce_task_leans_on_the_other_tasks_donor(pool2):
    model = pool2.fused(output="cross_residual").eval()
    val = scarce_rows(pool2)
    fitted = model.prepare(val.sparse, val.dense, val.labels)
    names = [s.name for s in pool2.specs]
    assert set(fitted["b"]) == {*names, "bias", "labelled_rows"}
    assert fitted["b"]["labelled_rows"] == int((~val.labels[:, 1].isnan()).sum()) < len(val)
    assert fitted["a"]["labelled_rows"] == len(val)
    sparse, dense = batch(300, seed=5)
    donors = donor_logits(pool2, sparse, dense)
    for t, task in enumerate(["a", "b"]):
        w = torch.tensor([fitted[task][n] for n in names])
        with torch.no_grad():
            torch.testing.assert_close(model(sparse, dense)[:, t], donors @ w + fitted[task]["bias"],
                                       rtol=1e-4, atol=1e-4)
    b_weights = np.abs([fitted["b"][n] * float(donors[:, i].std()) for i, n in enumerate(names)])
    assert b_weights.argmax() == 1  # a's second donor, the one b's labels follow
    assert b_weights[1] > 3 * b_weights[2:].max()  # b's own donors get little


def test_a_scarce_cross_stack_reaches_the_rich_donor_where_the_own_stack_cannot():
    """The probe's case in numbers: the scarce task's own donors are weak, the rich task's donor predicts it, and
    its labels sit on 2% of the rows. The cross stack ranks held-out rows about as well as the rich donor alone;
    the own-task stack cannot."""
    rng = np.random.default_rng(0)
    n = 40_000
    latent = rng.normal(size=n)
    own = 0.3 * latent + rng.normal(size=n)
    rich = latent + 0.5 * rng.normal(size=n)
    logits = np.stack([own, own + 0.3 * rng.normal(size=n), rich, rich + 0.3 * rng.normal(size=n)], axis=1)
    y = (latent + 0.6 * rng.normal(size=n) > 2.0).astype(float)
    labelled = rng.random(n) < 0.02
    labels = np.where(labelled, y, np.nan)
    weights, bias = fit_stack(logits, labels, task="conversion")
    own_w, own_b = fit_stack(logits[:, :2], labels, task="conversion")
    held = ~labelled
    auc = {"cross": roc_auc_score(y[held], logits[held] @ weights), "rich": roc_auc_score(y[held], rich[held]),
           "own": roc_auc_score(y[held], logits[held, :2] @ own_w)}
    assert auc["cross"] > auc["rich"] - 0.015 and auc["cross"] > auc["own"] + 0.15
    # calibrated at the start: the blend's mean probability on held-out rows is near the base rate
    p = 1 / (1 + np.exp(-(logits[held] @ weights + bias)))
    assert abs(p.mean() - y[held].mean()) < 0.02


# ---- labelled rows only ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fit", ["cross", "own"])
def test_the_stack_sees_only_labelled_rows(fit):
    """Rows without the task's label change nothing: fitted with NaN labels = fitted on the labelled rows alone,
    whatever the donor logits of the unlabelled rows are."""
    rng = np.random.default_rng(1)
    n = 3000
    logits = rng.normal(size=(n, 3))
    y = (logits[:, 0] + rng.normal(size=n) > 0.5).astype(float)
    labelled = rng.random(n) < 0.2
    labels = np.where(labelled, y, np.nan)
    cols = slice(None) if fit == "cross" else slice(0, 2)  # every donor, or a task's own two

    def fitter(x: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, float]:
        return fit_stack(x[:, cols], lab, task="t")
    w_all, b_all = fitter(logits, labels)
    w_sub, b_sub = fitter(logits[labelled], y[labelled])
    other = logits.copy()
    other[~labelled] = rng.normal(loc=5.0, scale=3.0, size=((~labelled).sum(), 3))
    w_other, b_other = fitter(other, labels)
    np.testing.assert_allclose(w_all, w_sub)
    np.testing.assert_allclose(w_all, w_other)
    assert b_all == pytest.approx(b_sub) and b_all == pytest.approx(b_other)
    # the guard: those rows' labels, had they been given, would have changed the fit
    w_given, _ = fitter(logits, np.where(labelled, y, 1.0 - y))
    assert not np.allclose(w_all, w_given, atol=1e-3)


@pytest.mark.parametrize("output", ["cross_residual", "donor_residual"])
@pytest.mark.parametrize("b_labels, problem", [(NAN, "no labelled row"), (1.0, "labelled rows of one class only")])
def test_a_task_without_a_fittable_labelled_row_is_refused_by_name(pool2, output, b_labels, problem):
    model = pool2.fused(output=output)
    val = scarce_rows(pool2, n=200)
    labels = val.labels.clone()
    labels[~labels[:, 1].isnan(), 1] = b_labels  # NaN: no b label left; 1.0: every b label positive
    with pytest.raises(EMMError, match=rf"task 'b' has {problem}.*validation split.*label_fraction"):
        model.prepare(val.sparse, val.dense, labels)


# ---- training, saving ----------------------------------------------------------------------------------------------
def test_the_runner_prepares_and_trains_on_rows_with_missing_labels(pool2):
    """The fuse procedure end to end with NaN labels: the stack on the labelled held-out rows, then the Trainer's
    masked loss on every train row; the model starts as the stack (epoch 0 scored) and stays finite."""
    train_cfg = TrainConfig(max_epochs=2, batch_size=64, lr=1e-2, device="cpu", patience=2, seed=3)
    plan = FusePlan.from_options(FuseOptions(output="cross_residual", tower=[4], train=train_cfg))
    runner = FuseRunner(plan, pool2.plan, pool2.model_tasks, pool2.schema, progress=False)
    val = scarce_rows(pool2, n=600, seed=21)
    blend = runner.prepare(lambda: val)
    assert blend["b"]["labelled_rows"] == int((~val.labels[:, 1].isnan()).sum())
    fitted = runner.train(scarce_rows(pool2, n=800, seed=31), val)
    assert fitted.fit.history[0]["epoch"] == 0 and np.isfinite(fitted.fit.best_val_auc)
    assert all(torch.isfinite(p).all() for p in runner.model.parameters())
    scores = runner.evaluate(val)
    assert set(scores) == {"a", "b"} and all(np.isfinite(m["auc"]) for m in scores.values())


def test_a_saved_cross_residual_model_reloads_bit_for_bit(pool2, tmp_path):
    model = pool2.fused(output="cross_residual").eval()
    val = scarce_rows(pool2)
    model.prepare(val.sparse, val.dense, val.labels)
    with torch.no_grad():
        model.towers[1].net[-1].bias.fill_(0.25)  # a trained residual, so the towers' weights are checked too
    record = json.loads(json.dumps(architecture(pool2.specs, DecomposeConfig(), model)))
    assert record["fused"]["options"]["output"] == "cross_residual"
    save_module(model, tmp_path / "fused.safetensors")
    rebuilt = build_from_config(record, pool2.schema)
    load_module(rebuilt, tmp_path / "fused.safetensors", what="fused model")
    rebuilt.eval()
    assert isinstance(rebuilt.output_head, CrossResidualOutput) and torch.equal(rebuilt.blend.mask, torch.ones(2, 4))
    x = batch(50, seed=8)
    with torch.no_grad():
        assert torch.equal(model(*x), rebuilt(*x))
