"""Distillation from the donor ensemble: the soft targets, the teacher, and a trainer that follows them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.fusion.blend import DonorEnsemble
from emm.train.distill import Distillation
from emm.train.options import TrainConfig
from emm.train.predict import predict_proba
from emm.train.trainer import Trainer
from tests.unit.test_akf import Pool, batch
from tests.unit.test_blend import donor_means


class Constant(nn.Module):
    """A teacher or student that ignores its inputs: one logit per task."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(logits))

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.logit.expand(len(sparse), -1)


@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"], dropout=0.3)


def test_targets_mix_the_labels_with_the_teachers_probabilities():
    sparse, dense = batch(8)
    labels = (torch.arange(16).reshape(8, 2) % 3 == 0).float()
    teacher = Constant([2.0, -1.0])
    targets = Distillation(teacher, 0.25).targets(sparse, dense, labels)
    expected = 0.75 * labels + 0.25 * torch.sigmoid(torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(targets, expected)
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen once it is a teacher


@pytest.mark.parametrize("weight", [0.0, 1.0, -0.1, 1.5])
def test_a_weight_outside_the_open_unit_interval_is_refused(weight):
    with pytest.raises(EMMError, match=r"outside \(0, 1\)"):
        Distillation(Constant([0.0]), weight)


def test_a_teacher_of_other_tasks_is_refused():
    sparse, dense = batch(4)
    with pytest.raises(EMMError, match="must score the student's tasks"):
        Distillation(Constant([0.0, 0.0, 0.0]), 0.5).targets(sparse, dense, torch.zeros(4, 2))


def test_the_trainer_learns_the_soft_targets_and_still_scores_the_labels():
    """A student that can only learn a constant ends at the mean target: the labels' rate without a teacher,
    (1 - w) x rate + w x the teacher's probability with one."""
    sparse, dense = batch(8192, seed=1)
    labels = (torch.rand(8192, 1, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    data = SplitTensors(sparse, dense, labels, ["a"])
    # one epoch: a constant's validation AUC never improves, so early stopping keeps epoch 1's weights
    cfg = TrainConfig(max_epochs=1, batch_size=128, lr=0.05, device="cpu")
    learned = {}
    for weight in (None, 0.5):
        student = Constant([0.0])
        distill = Distillation(Constant([3.0]), weight) if weight else None
        fit = Trainer(student, cfg, progress=False, distill=distill).fit(data, data)
        learned[weight] = float(predict_proba(student, data, 4096, torch.device("cpu")).mean())
        assert all(row["val_auc"] == 0.5 for row in fit.history)  # a constant's AUC: validation saw labels
    rate = float(labels.mean())
    assert learned[None] == pytest.approx(rate, abs=0.02)
    assert learned[0.5] == pytest.approx(0.5 * rate + 0.5 * float(torch.sigmoid(torch.tensor(3.0))), abs=0.02)


def test_a_checkpoint_of_other_targets_is_not_resumed(tmp_path):
    cfg = TrainConfig(max_epochs=1, device="cpu")
    plain = Trainer(Constant([0.0]), cfg, checkpoint_dir=tmp_path, progress=False)
    distilled = Trainer(Constant([0.0]), cfg, checkpoint_dir=tmp_path, progress=False,
                        distill=Distillation(Constant([1.0]), 0.5))
    assert distilled.made_from["distill_weight"] == 0.5 and "distill_weight" not in plain.made_from
    assert distilled.made_from_digest != plain.made_from_digest


def test_the_donor_ensemble_is_the_mean_of_each_tasks_donors_and_stays_frozen(pool2):
    teacher = DonorEnsemble(pool2.plan, pool2.model_tasks, pool2.tasks)
    teacher.train()  # asked to train, it stays in eval mode: dropout never acts on the targets
    sparse, dense = batch(128, seed=5)
    with torch.no_grad():
        out = teacher(sparse, dense)
    torch.testing.assert_close(out, donor_means(pool2, sparse, dense), rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(not m.training for m in teacher.modules())
    assert np.isfinite(out.numpy()).all()
