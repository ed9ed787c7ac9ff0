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

``output="cross_residual"`` (``CrossResidualOutput``) lets every donor's logit enter every task's blend:
the cross-task stack. Why: when one task has scarce labels, its own donor learned little, while a rich
task's donor may rank its rows far better (a click model scoring conversions); a blend over its own
donors alone can never reach that. Its stack is the same fit as the own-task one (``fit_stack``:
scikit-learn's logistic regression, its default light L2, on raw logits). Why not an L2 strength chosen by
cross-validation: a scarce task has a few dozen labelled positives in validation, a few per fold, so the
fold AUCs pick the strength by noise; a strong one then weights every donor by its marginal correlation,
noise donors included, and on the scarce benchmark that ranked test rows worse than the plain fit on every
seed (README, "When fusion pays").

Tree members (LightGBM, XGBoost: ``emm.models.trees``) cannot be decomposed, so they join here and only here:
each is an ``OutputMember``, one more frozen donor after the plan's networks, whose logit enters its task's blend
(every task's under ``cross_residual``) and so the stack, like any donor's. A fine-tune phase never thaws one (its
leaf values are what the library fitted), and a tree no blend weighs is left out by pruning like any donor.

Labels may be missing (NaN): every stack is fitted on the task's *labelled* held-out rows only
(``labelled_rows``), and a task with none, or with a single class among them, is refused by name.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from emm.data.labels import require_labelled
from emm.errors import EMMError
from emm.fusion.decompose import Plan
from emm.train import compare


@dataclass(frozen=True)
class OutputMember:
    """A pool member that joins the fused model at the output only (a tree model): its frozen module, taking
    ``(sparse, dense)`` and returning one logit per row, and what ``fused.json`` records of it (``file``: its
    native file's name in ``pool/`` and ``fused/``, ``sha256``: that file's digest)."""

    name: str
    task: str
    module: nn.Module
    file: str
    sha256: str


class DonorPaths(nn.Module):
    """Every pool model as decomposed (components then head), frozen, then the output members (``trees``, the
    tree models, in pool order): ``(sparse, dense) -> [B, n_models + n_trees]``.

    They are deep copies of the plan's pieces, so the fused levels (which may re-initialise their
    own copies under the ``baseline``/``+mtm`` ablations) never change them; ``train()`` keeps them
    in eval mode, so Dropout never acts and BatchNorm statistics never move.

    Pruned (``emm.fusion.prune``, a scoring model only): ``kept`` lists the donors that still run (a donor no
    blend weighs is not run, and the output has one column per kept donor, in pool order), and with
    ``shares_first`` every kept path's first piece is the fused model's AKF level 0 component, whose outputs
    ``forward`` is then handed as ``first`` instead of computing them again. A dropped piece leaves a stateless
    placeholder, so the remaining state-dict names are the unpruned model's.
    """

    def __init__(self, plan: Plan, outputs: Sequence[OutputMember] = ()) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            nn.ModuleList([*copy.deepcopy(plan.components[i]), copy.deepcopy(plan.heads[i])])
            for i in range(plan.num_models))
        if outputs:  # only then: a pool without trees keeps the state dict (and module tree) it always had
            self.trees = nn.ModuleList(copy.deepcopy(m.module) for m in outputs)
        self.n_paths = plan.num_models
        self.kept = list(range(plan.num_models + len(outputs)))
        self.shares_first = False
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DonorPaths:
        super().train(False)
        return self

    def forward(self, *inputs: Tensor, first: Sequence[Tensor] | None = None) -> Tensor:
        """``[B, len(kept)]``: each kept donor's logit; ``first[i]``: donor i's first piece's output, when shared."""
        if self.shares_first and first is None:
            raise EMMError("these donor paths share their first piece with the fused model's AKF level 0: score "
                           "them through the fused model, which hands them that level's outputs")
        out = []
        for i in self.kept:
            if i >= self.n_paths:  # a tree: it reads the raw inputs, never a shared first piece
                out.append(self.trees[i - self.n_paths](*inputs)[:, :1])
                continue
            path = self.paths[i]
            h = first[i] if first is not None else path[0](*inputs)
            for piece in path[1:]:
                h = piece(h)
            out.append(h.reshape(h.shape[0], -1)[:, :1])  # a donor returns one logit per row ([B] or [B, 1])
        if not out:  # pruned: no blend weighs any donor, so every task's logit is its bias
            ref = inputs[0]
            return torch.zeros(ref.shape[0], 0, device=ref.device)
        return torch.cat(out, dim=1)


class DonorBlend(nn.Module):
    """Per task, an affine map of donor logits: ``sum_i w_ti * logit_i + b_t``.

    Stored as a dense ``[T, n_models]`` weight with a fixed mask, so the state dict is plain tensors
    (``weight``, ``bias``, and the ``mask`` buffer). By default a task blends only its own donors; with
    ``cross=True`` the mask is full and every donor may enter every task's blend (the cross-task stack of
    ``output="cross_residual"``: a task with scarce labels draws on a rich task's donor that predicts it).
    Either way it starts as the mean of each task's own donors (other tasks' weights zero), so the mean
    start is the same model with or without ``cross``.
    """

    def __init__(self, model_tasks: Sequence[str], task_names: Sequence[str], *, cross: bool = False) -> None:
        super().__init__()
        own = torch.tensor([[float(m == t) for m in model_tasks] for t in task_names])
        if (own.sum(1) == 0).any():
            missing = [t for t, row in zip(task_names, own) if row.sum() == 0]
            raise EMMError(f"task(s) {missing} have no donor in the pool; add a model for each task")
        self.cross = cross
        self.register_buffer("mask", torch.ones_like(own) if cross else own)
        self.weight = nn.Parameter(own / own.sum(1, keepdim=True))
        self.bias = nn.Parameter(torch.zeros(len(task_names)))
        self.columns: list[int] | None = None  # pruned: the donors ``forward`` is given logits of (``DonorPaths.kept``)

    def forward(self, donor_logits: Tensor) -> Tensor:
        weight = self.weight * self.mask
        if self.columns is not None:  # the donors left out weigh exactly 0 in every task (``emm.fusion.prune``)
            weight = weight[:, self.columns]
        return donor_logits @ weight.T + self.bias

    def members(self, t: int) -> list[int]:
        """The donors (pool indices, in pool order) that may enter task ``t``'s blend."""
        return torch.nonzero(self.mask[t]).flatten().tolist()

    @torch.no_grad()
    def set_task(self, t: int, weights: np.ndarray, bias: float) -> None:
        """Set task ``t``'s weights over its blend's donors (``members(t)``, in pool order) and its bias."""
        members = self.members(t)
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

    def __init__(self, plan: Plan, model_tasks: Sequence[str], task_names: Sequence[str],
                 outputs: Sequence[OutputMember] = ()) -> None:
        super().__init__()
        self.donors = DonorPaths(plan, outputs)
        self.mean = DonorBlend([*model_tasks, *(m.task for m in outputs)], task_names)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DonorEnsemble:
        super().train(False)
        return self

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """``[B, T]``: each task's mean donor logit."""
        return self.mean(self.donors(sparse, dense))


def labelled_rows(labels: np.ndarray, task: str) -> np.ndarray:
    """The mask of ``task``'s labelled rows (NaN = no label) among the held-out rows a stack is fitted on, refusing
    what no stack can be fitted on (no labelled row, or labelled rows of a single class) in the wording every stage
    uses (``emm.data.labels.require_labelled``)."""
    return require_labelled(np.asarray(labels, dtype=np.float64).ravel(), task, "val",
                            "the validation split: the fused model's donor stack is fitted on its labelled rows")


def fit_stack(donor_logits: np.ndarray, labels: np.ndarray, *, task: str = "this task") -> tuple[np.ndarray, float]:
    """One task's donor stack (``emm.train.compare.fit_stack``, the one the report's donor-stack row uses),
    as the (weights, bias) the blend takes. Fitted on validation rows, which the donors never trained on, and
    only on those labelled for the task (``labels`` NaN = no label): ``labelled_rows`` refuses a task with none."""
    mask = labelled_rows(labels, task)
    model = compare.fit_stack(np.asarray(donor_logits)[mask], np.asarray(labels, dtype=np.float64).ravel()[mask])
    return model.coef_.ravel(), float(model.intercept_[0])


def fit_blend(model: nn.Module, sparse: Tensor, dense: Tensor, labels: Tensor, *,
              batch_size: int = 65536) -> dict[str, dict[str, float]]:
    """Set a donor-residual (or cross-residual) fused model's blend to the stack fitted on these (validation) rows.

    The fit is the output head's ``prepare`` (``emm.fusion.recipes.output.DonorResidualOutput``), reached
    through ``FusedModel.prepare``; this name is kept for its callers. ``labels`` is ``[N, T]`` in the model's
    task order (NaN = no label: each task is fitted on its labelled rows). Returns the fitted weights per task,
    named by donor, for the record.
    """
    prepare = getattr(model, "prepare", None)
    fitted = prepare(sparse, dense, labels, batch_size=batch_size) if callable(prepare) else None
    if fitted is None:
        raise EMMError("fit_blend needs a fused model built with output='donor_residual' or 'cross_residual'")
    return fitted
