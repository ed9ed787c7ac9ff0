"""The donors' own predictions inside the fused model: each donor's whole frozen path, and their blend.

Why: a fused model that drops the donors' heads starts from something no donor computes and must
re-learn, through frozen layers, what the donors already knew; in practice it ended below its best
donor. With ``output="donor_residual"`` the fused model keeps every donor whole (its embedding,
components and head, frozen, in eval mode) and predicts, per task,

    logit_t = blend_t(donor logits of task t) + r_t

where ``blend_t`` is a per-task affine map of the task's donor logits (initialised to their mean, or
fitted on validation logits: a logistic-regression stack) and ``r_t`` is the AKF stack's tower output,
whose last layer starts at zero. So at step 0 the fused model *is* the blend, and training can only
add to it what the cross-task AKF levels find. The recipe that puts these modules in a fused model (and
fits the stack) is ``emm.fusion.recipes.output.DonorResidualOutput``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from emm.errors import EMMError
from emm.fusion.decompose import Plan
from emm.train import compare


class DonorPaths(nn.Module):
    """Every pool model as decomposed (components then head), frozen: ``(sparse, dense) -> [B, n_models]``.

    They are deep copies of the plan's pieces, so the fused levels (which may re-initialise their
    own copies under the ``baseline``/``+mtm`` ablations) never change them; ``train()`` keeps them
    in eval mode, so Dropout never acts and BatchNorm statistics never move.
    """

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            nn.ModuleList([*copy.deepcopy(plan.components[i]), copy.deepcopy(plan.heads[i])])
            for i in range(plan.num_models))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DonorPaths:
        super().train(False)
        return self

    def forward(self, *inputs: Tensor) -> Tensor:
        out = []
        for path in self.paths:
            h = path[0](*inputs)
            for piece in path[1:]:
                h = piece(h)
            out.append(h.reshape(h.shape[0], -1)[:, :1])  # a donor returns one logit per row ([B] or [B, 1])
        return torch.cat(out, dim=1)


class DonorBlend(nn.Module):
    """Per task, an affine map of that task's donor logits: ``sum_i w_ti * logit_i + b_t``.

    Stored as a dense ``[T, n_models]`` weight with a fixed mask (a task only blends its own donors), so
    the state dict is plain tensors. Starts as the mean of each task's donors.
    """

    def __init__(self, model_tasks: Sequence[str], task_names: Sequence[str]) -> None:
        super().__init__()
        mask = torch.tensor([[float(m == t) for m in model_tasks] for t in task_names])
        if (mask.sum(1) == 0).any():
            missing = [t for t, row in zip(task_names, mask) if row.sum() == 0]
            raise EMMError(f"task(s) {missing} have no donor in the pool; add a model for each task")
        self.register_buffer("mask", mask)
        self.weight = nn.Parameter(mask / mask.sum(1, keepdim=True))
        self.bias = nn.Parameter(torch.zeros(len(task_names)))

    def forward(self, donor_logits: Tensor) -> Tensor:
        return donor_logits @ (self.weight * self.mask).T + self.bias

    @torch.no_grad()
    def set_task(self, t: int, weights: np.ndarray, bias: float) -> None:
        """Set task ``t``'s weights over its own donors (in pool order) and its bias."""
        members = torch.nonzero(self.mask[t]).flatten()
        if len(weights) != len(members):
            raise EMMError(f"blend for task {t}: {len(weights)} weights for {len(members)} donors")
        self.weight[t].zero_()
        self.weight[t, members] = torch.as_tensor(np.asarray(weights), dtype=self.weight.dtype)
        self.bias[t] = float(bias)


class DonorEnsemble(nn.Module):
    """The pool's donor ensemble: per task, the plain mean of its donors' logits, everything frozen.

    Why a module of its own: it is the teacher that ``fuse.distill`` distils from, whatever the fused
    model's ``output`` (a ``tower`` model keeps no donors of its own). It holds its own copy of the
    donors, not the fused model's, so a fine-tune phase that thaws those never moves the teacher.
    Training-only: it is never part of the fused model, so nothing of it lands in ``fused/``.
    """

    def __init__(self, plan: Plan, model_tasks: Sequence[str], task_names: Sequence[str]) -> None:
        super().__init__()
        self.donors = DonorPaths(plan)
        self.mean = DonorBlend(model_tasks, task_names)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DonorEnsemble:
        super().train(False)
        return self

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """``[B, T]``: each task's mean donor logit."""
        return self.mean(self.donors(sparse, dense))


def fit_stack(donor_logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """One task's donor stack (``emm.train.compare.fit_stack``, the one the report's donor-stack row uses),
    as the (weights, bias) the blend takes. Fitted on validation rows, which the donors never trained on."""
    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        raise EMMError("cannot fit the donor stack: the validation split has a single class for this task")
    model = compare.fit_stack(donor_logits, labels)
    return model.coef_.ravel(), float(model.intercept_[0])


def fit_blend(model: nn.Module, sparse: Tensor, dense: Tensor, labels: Tensor, *,
              batch_size: int = 65536) -> dict[str, dict[str, float]]:
    """Set a donor-residual fused model's blend to the donor stack fitted on these (validation) rows.

    The fit is the output head's ``prepare`` (``emm.fusion.recipes.output.DonorResidualOutput``), reached
    through ``FusedModel.prepare``; this name is kept for its callers. ``labels`` is ``[N, T]`` in the model's
    task order. Returns the fitted weights per task, named by donor, for the record.
    """
    prepare = getattr(model, "prepare", None)
    fitted = prepare(sparse, dense, labels, batch_size=batch_size) if callable(prepare) else None
    if fitted is None:
        raise EMMError("fit_blend needs a fused model built with output='donor_residual'")
    return fitted
