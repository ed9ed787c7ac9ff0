"""The donor-residual fused model: at step 0 it is exactly its donors' blend, and the donors stay frozen."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from emm.data.tensors import SplitTensors
from emm.fusion.blend import fit_blend, fit_stack
from emm.train.options import TrainConfig
from emm.train.trainer import Trainer
from tests.unit.test_akf import Pool, batch


@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"], dropout=0.3)


def donor_means(pool: Pool, sparse, dense) -> torch.Tensor:
    with torch.no_grad():
        logits = torch.cat([m(sparse, dense) for m in pool.models], dim=1)
    return torch.stack([logits[:, [i for i, t in enumerate(pool.model_tasks) if t == task]].mean(1)
                        for task in pool.tasks], dim=1)


@pytest.mark.parametrize("ablation", ["full", "+pretrained", "baseline"])
@pytest.mark.parametrize("embedding", ["retrain", "reuse"])
def test_step0_is_the_mean_of_each_tasks_donors(pool2, ablation, embedding):
    model = pool2.fused(output="donor_residual", ablation=ablation, embedding=embedding)
    sparse, dense = batch(128, seed=3)
    model.train()  # train mode: dropout on everything trainable, yet the output is still the blend
    torch.testing.assert_close(model(sparse, dense), donor_means(pool2, sparse, dense), rtol=1e-5, atol=1e-6)


def test_tower_output_is_not_the_donors(pool2):
    """The guard: without the donor residual the fused model computes something no donor computes."""
    model = pool2.fused(output="tower").eval()
    sparse, dense = batch(128, seed=3)
    assert not torch.allclose(model(sparse, dense), donor_means(pool2, sparse, dense), atol=1e-3)


def test_donors_stay_bit_identical_through_training(pool2):
    model = pool2.fused(output="donor_residual")
    before = copy.deepcopy(model.donors.state_dict())
    sparse, dense = batch(512, seed=1)
    labels = (torch.rand(512, 2, generator=torch.Generator().manual_seed(2)) < 0.4).float()
    data = SplitTensors(sparse, dense, labels, ["a", "b"])
    Trainer(model, TrainConfig(max_epochs=3, batch_size=64, lr=1e-2, device="cpu", patience=5), progress=False,
            score_start=True).fit(data, data)
    after = model.donors.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.donors.parameters())
    assert all(not m.training for m in model.donors.modules())


def test_score_start_never_returns_worse_than_the_start_on_validation(pool2):
    """Labels the model cannot learn from (noise): training only hurts validation, so the start is kept."""
    model = pool2.fused(output="donor_residual")
    start = copy.deepcopy(model.state_dict())
    sparse, dense = batch(256, seed=5)
    gen = torch.Generator().manual_seed(6)
    train = SplitTensors(sparse, dense, (torch.rand(256, 2, generator=gen) < 0.5).float(), ["a", "b"])
    val_s, val_d = batch(256, seed=7)
    means = donor_means(pool2, val_s, val_d)
    val = SplitTensors(val_s, val_d, (means > means.median(0).values).float(), ["a", "b"])
    trainer = Trainer(model, TrainConfig(max_epochs=4, batch_size=32, lr=5e-2, device="cpu", patience=4),
                      progress=False, score_start=True)
    fit = trainer.fit(train, val)
    assert fit.history[0]["epoch"] == 0
    if fit.best_epoch == 0:
        assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert fit.best_val_auc >= fit.history[0]["val_auc"]


def test_fitted_stack_makes_step0_the_stack(pool2):
    model = pool2.fused(output="donor_residual").eval()
    sparse, dense = batch(600, seed=11)
    with torch.no_grad():
        donors = torch.cat([m(sparse, dense) for m in pool2.models], dim=1)
    centred = (donors - donors.median(0).values) / donors.std(0)
    noise = 0.3 * torch.randn(600, generator=torch.Generator().manual_seed(0))
    labels = torch.stack([centred[:, 1] + noise > 0, centred[:, 2] > 0], dim=1).float()
    fitted = fit_blend(model, sparse, dense, labels)
    w, b = fitted["a"][pool2.specs[1].name], fitted["a"]["bias"]
    expected_a = donors[:, 0] * fitted["a"][pool2.specs[0].name] + donors[:, 1] * w + b
    torch.testing.assert_close(model(sparse, dense)[:, 0], expected_a, rtol=1e-5, atol=1e-5)
    assert abs(w) > abs(fitted["a"][pool2.specs[0].name])  # the stack leans on the donor the labels follow


def test_fit_stack_ignores_a_noise_donor():
    rng = np.random.default_rng(0)
    signal = rng.normal(size=5000)
    labels = (signal + 0.5 * rng.normal(size=5000) > 0).astype(int)
    weights, _ = fit_stack(np.stack([signal, rng.normal(size=5000)], axis=1), labels)
    assert weights[0] > 1.0 and abs(weights[1]) < 0.1


@pytest.mark.parametrize("output", ["donor_residual", "tower"])
def test_unfreeze_pool_thaws_the_donors_and_components_only(pool2, output):
    """The fine-tune phase: every pool-derived parameter becomes trainable (and moves under a step), the
    model's output at that moment is unchanged, and the pieces stay in eval mode (no dropout noise)."""
    model = pool2.fused(output=output)
    pool_params = {id(p) for m in [*model.component_modules(), *([model.donors] if model.donors else [])]
                   for p in m.parameters()}
    before_trainable = {id(p) for p in model.trainable_parameters()}
    assert not pool_params & before_trainable
    sparse, dense = batch(64, seed=21)
    with torch.no_grad():
        ref = model.eval()(sparse, dense)
    thawed = model.unfreeze_pool()
    assert {id(p) for p in thawed} == pool_params and all(p.requires_grad for p in thawed)
    assert {id(p) for p in model.trainable_parameters()} == before_trainable | pool_params
    model.train()
    assert all(not m.training for m in model.component_modules())
    torch.testing.assert_close(model(sparse, dense), ref)  # train mode, yet no dropout acts on the pool
    donor_before = copy.deepcopy(model.donors.state_dict()) if model.donors is not None else None
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model(sparse, dense).sum().backward()
    opt.step()
    if donor_before is not None:
        assert any(not torch.equal(donor_before[k], v) for k, v in model.donors.state_dict().items())
    assert model.unfreeze_pool() == []  # nothing left to thaw
