"""Knowledge distillation: train on targets that mix the labels with a frozen teacher's probabilities.

Why soft targets rather than a second loss term: binary cross-entropy is linear in its target, so
``(1 - w) * BCE(z, y) + w * BCE(z, sigmoid(teacher))`` *is* ``BCE(z, (1 - w) * y + w * sigmoid(teacher))``.
One loss, the trainer's own, with the targets replaced batch by batch; the teacher runs on the same
batch, so it works alike for in-memory splits, streamed Parquet and DDP shards, and nothing extra is
stored. Only training batches are touched: validation (early stopping) and test still score against
the labels, so a teacher can never make a model look better than it is.

A missing label (NaN) stays missing in the target: NaN mixed with the teacher is NaN, and the trainer's
loss leaves NaN targets out. So the teacher only softens the labels that exist; it never stands in for
an absent one. Training on the teacher alone where a label is missing would be pseudo-labelling, a
different method whose gain (or harm: the teacher's errors become targets) should be measured on its own,
and it would make the loss of a scarce task depend mostly on rows nobody labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from emm.errors import EMMError
from emm.train.modes import eval_mode


@dataclass
class Distillation:
    """A frozen ``teacher`` (``(sparse, dense) -> logits [B, T]`` in the student's task order) and the
    ``weight`` of its probabilities in the training targets (0 < weight < 1)."""

    teacher: nn.Module
    weight: float

    def __post_init__(self) -> None:
        if not 0.0 < self.weight < 1.0:
            raise EMMError(f"distillation weight {self.weight} is outside (0, 1): 0 means labels only (pass no "
                           "teacher), 1 would ignore the labels altogether")
        self.teacher.requires_grad_(False)

    def to(self, device: torch.device) -> Distillation:
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def targets(self, sparse: Tensor, dense: Tensor, labels: Tensor) -> Tensor:
        """``(1 - weight) * labels + weight * sigmoid(teacher logits)``, the teacher in eval mode; a NaN
        (missing) label gives a NaN target, which the trainer's loss masks (see the module docstring)."""
        with eval_mode(self.teacher):
            soft = torch.sigmoid(self.teacher(sparse, dense))
        if soft.shape != labels.shape:
            raise EMMError(f"the distillation teacher returns {list(soft.shape)} per batch but the labels are "
                           f"{list(labels.shape)}; the teacher must score the student's tasks, in its order")
        return (1.0 - self.weight) * labels + self.weight * soft.to(labels.dtype)
