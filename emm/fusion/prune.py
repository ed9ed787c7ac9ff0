"""A trained fused model cut down to what changes its output: the model ``fuse`` saves and ``evaluate`` registers.

Why: under ``donor_residual``/``cross_residual`` a task put back to its step-0 output (early stopping kept epoch 0,
or ``keep_start_per_task``) has its residual tower's last layer exactly zero, yet the fresh embedding, every AKF
level and the tower still ran on every row to add exactly nothing; with the default recipe on Census that is the
usual outcome. Scoring should pay only for what moves a score.

What is left out, each proved from the module structure and the weights, never by sampling outputs:

``residual_off`` (tasks)
    the task's tower is a plain ``Tower`` (its ``forward`` is its ``Sequential``) ending in an ``nn.Linear`` whose
    weight and bias are exactly 0, so it outputs 0 for every finite input: the tower is not run and the task's
    logit is its blend. When every task is so, no AKF work is left: the fresh embedding, every level and every
    tower are dropped (``stack_off``).
``donors_off`` (pool models)
    a donor whose weight is exactly 0 in every task's blend (its column of ``weight * mask``): its path (or, for a
    tree member, its tree) is not run, and the blend reads the kept donors' columns only.
``shared_level0``
    while AKF level 0 stays, when each of its components is the very module (same class and code, same
    hyper-parameters, every tensor equal, frozen) that starts that donor's path, run on the same raw
    ``(sparse, dense)`` (no ``pre`` adapter): the donors take level 0's outputs instead of computing them again.

Kept whole, on purpose: the AKF levels while any task keeps a residual. With MTM (``full``/``+mtm``) task t's
fused output at a level is what every other task may select there, and it feeds t's own next level, so every
task's components run at every level; only the last level's fusion gate and merge of a task without residual are
dead work (the narrowest layers of the model), not worth a second forward path and a gate report with holes.
Without MTM each task's chain is its own, but those ablations are for the paper's Table II, not for serving.

Not done: running same-shaped frozen components of one level (or of the donors' paths) as one batched matmul over
stacked weights. Their inputs differ (each task's, each donor's own), so a batch must first stack them, and on
Census-sized batches on CPU ``torch.baddbmm`` over stacked weights was slower than the separate calls, even with the
inputs stacked beforehand (issue 25's report has the measurement).

How it is kept: ``Pruning`` is what ``fused.json``'s architecture records (``FusedModel.config_dict()["pruned"]``),
and ``apply_pruning`` is the one structural transform: ``prune`` applies it to a copy of a trained model,
``FusedModel.from_config`` to a freshly built one before the saved weights load strictly. A dropped module leaves
a stateless ``Dropped`` placeholder (or an empty path), so every name the pruned state dict keeps is the unpruned
model's name for the same tensor. A pruned model scores; it is not trained further (its donors, towers and blend
are no longer all there), and ``FusedModel`` refuses to prepare or restore one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from emm.errors import EMMError
from emm.fusion.recipes.output import DonorResidualOutput
from emm.models.single_task import Tower
from emm.train.cost import model_cost

FusedModel = Any  # ``emm.fusion.fused.FusedModel``, which imports this module: typed loosely here, as the recipes do

REASONS = {
    "residual_off": "the task's residual tower ends in a Linear whose weight and bias are exactly 0, so it adds "
                    "exactly 0 to every row: its logit is its donors' blend",
    "stack_off": "no task keeps a residual: the embedding, the AKF levels and the towers are not run",
    "donors_off": "the donor's weight is exactly 0 in every task's blend, so its logit changes no score",
    "shared_level0": "AKF level 0 runs the same frozen modules on the same raw inputs as the first pieces of the "
                     "donors' paths: computed once, handed to both",
}


class Dropped(nn.Module):
    """Stands where a pruned module was: no state, never run; it keeps list indices (and so the state-dict names
    of what follows) where they were."""

    def __init__(self, why: str) -> None:
        super().__init__()
        self.why = why

    def forward(self, *args: Tensor) -> Tensor:
        raise EMMError(f"a module the pruned fused model left out was called ({self.why}); score through "
                       "FusedModel.forward")

    def extra_repr(self) -> str:
        return f"pruned: {self.why}"


@dataclass(frozen=True)
class Pruning:
    """What a fused model leaves out (see the module docstring): tasks without residual, donors no blend weighs,
    and whether the donors take AKF level 0's outputs."""

    residual_off: tuple[str, ...] = ()
    donors_off: tuple[str, ...] = ()
    shared_level0: bool = False

    @property
    def empty(self) -> bool:
        return not (self.residual_off or self.donors_off or self.shared_level0)

    def stack_off(self, task_names: list[str]) -> bool:
        """Whether no task keeps a residual, so no AKF work is left."""
        return bool(task_names) and set(self.residual_off) == set(task_names)

    def config(self, task_names: list[str]) -> dict[str, Any]:
        """``fused.json``'s record: what was left out, and why (the reasons are read by people, not by loaders)."""
        applies = {"residual_off": bool(self.residual_off), "stack_off": self.stack_off(task_names),
                   "donors_off": bool(self.donors_off), "shared_level0": self.shared_level0}
        return {"residual_off": list(self.residual_off), "donors_off": list(self.donors_off),
                "shared_level0": self.shared_level0, "why": {k: REASONS[k] for k, on in applies.items() if on}}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Pruning:
        try:
            return cls(tuple(str(t) for t in config.get("residual_off", [])),
                       tuple(str(m) for m in config.get("donors_off", [])), bool(config.get("shared_level0", False)))
        except (AttributeError, TypeError) as exc:
            raise EMMError(f"fused-model config has an invalid 'pruned' section ({exc!r}); fuse again") from exc


# ---- the proofs ---------------------------------------------------------------------------------------------------
def residual_is_zero(tower: nn.Module) -> bool:
    """Whether this tower outputs exactly 0 for every finite input, read off its structure and weights: a plain
    ``Tower`` whose ``Sequential`` ends in a ``Linear`` with weight and bias all 0 (or a tower already dropped)."""
    if isinstance(tower, Dropped):
        return True
    if type(tower) is not Tower or type(tower.net) is not nn.Sequential:
        return False
    last = tower.net[-1]
    return type(last) is nn.Linear and last.bias is not None and not last.weight.any() and not last.bias.any()


def unweighted_donors(model: FusedModel) -> list[str]:
    """The donors whose weight is exactly 0 in every task's blend (none for a model without a blend)."""
    if model.blend is None:
        return []
    weight = (model.blend.weight * model.blend.mask).detach()
    return [name for i, name in enumerate(model.donor_names) if not weight[:, i].any()]


def same_module(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules compute the same function: same class, same traced code, same hyper-parameters (their
    repr), the same tensors in their state dicts, and neither in training mode (Dropout, BatchNorm statistics)."""
    if isinstance(a, fx.GraphModule) and isinstance(b, fx.GraphModule):  # fx makes a class per instance
        if a.code != b.code:
            return False
    elif type(a) is not type(b):
        return False
    if a.training or b.training or repr(a) != repr(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def level0_shareable(model: FusedModel, donors_off: tuple[str, ...] = ()) -> bool:
    """Whether the donors may take AKF level 0's component outputs: level 0 is fused on the raw inputs, frozen,
    with no ``pre`` adapter, and each kept donor's first piece is the same module as its level-0 component; the
    output head is a donor head (``DonorResidualOutput`` and its kin), which hands the donors those outputs."""
    donors = model.donors
    if not isinstance(model.output_head, DonorResidualOutput) or donors is None or not model.levels \
            or model.replaces_level0:
        return False
    if donors.shares_first:
        return True
    level = model.levels[0]
    if level.index != 0 or not level.frozen:
        return False
    kept = [i for i in donors.kept if i < donors.n_paths and model.model_names[i] not in donors_off]
    return bool(kept) and all(level.pre[i] is None and same_module(level.components[i], donors.paths[i][0])
                              for i in kept)


def find_pruning(model: FusedModel) -> Pruning:
    """What ``model`` can leave out without changing a score (each part proved as the module docstring says)."""
    off = tuple(task for task, tower in zip(model.task_names, model.towers) if residual_is_zero(tower))
    donors_off = tuple(unweighted_donors(model))
    stack_stays = set(off) != set(model.task_names)
    return Pruning(off, donors_off, stack_stays and level0_shareable(model, donors_off))


# ---- the transform ------------------------------------------------------------------------------------------------
def apply_pruning(model: FusedModel, pruning: Pruning) -> None:
    """Leave out of ``model`` (in place) what ``pruning`` names: the one structural transform, applied to a trained
    model's copy (``prune``) and to a freshly built one before its saved weights load (``FusedModel.from_config``)."""
    unknown = [t for t in pruning.residual_off if t not in model.task_names] + \
              [m for m in pruning.donors_off if m not in model.donor_names]
    if unknown:
        raise EMMError(f"fused-model config prunes {unknown}, which the model does not have (tasks "
                       f"{model.task_names}, pool models {model.donor_names}); fuse again")
    if (pruning.donors_off or pruning.shared_level0) and (model.donors is None or model.blend is None):
        raise EMMError(f"fused-model config prunes donors, but output {model.cfg.output!r} keeps none; fuse again")
    stack_off = pruning.stack_off(model.task_names)
    if pruning.shared_level0 and (stack_off or not level0_shareable(model, pruning.donors_off)):
        raise EMMError("fused-model config shares AKF level 0 with the donors, but this model's level 0 is not "
                       "theirs (or is pruned away); fuse again")
    for t, task in enumerate(model.task_names):
        if task in pruning.residual_off:
            model.towers[t] = Dropped(REASONS["residual_off"])
    if stack_off:
        model.embedding = None
        model.levels = nn.ModuleList()
    if pruning.donors_off:
        off = {model.donor_names.index(m) for m in pruning.donors_off}
        for i in off:
            if i < model.donors.n_paths:
                model.donors.paths[i] = nn.ModuleList()
            else:  # a tree member no blend weighs
                model.donors.trees[i - model.donors.n_paths] = Dropped(REASONS["donors_off"])
        model.donors.kept = [i for i in model.donors.kept if i not in off]
        model.blend.columns = list(model.donors.kept)
    if pruning.shared_level0 and not model.donors.shares_first:
        for i in model.donors.kept:
            if i < model.donors.n_paths:  # a tree member reads the raw inputs: it has no first piece to share
                model.donors.paths[i][0] = Dropped(REASONS["shared_level0"])
        model.donors.shares_first = True
    model.pruning = pruning


def prune(model: FusedModel) -> FusedModel:
    """A copy of ``model`` (in eval mode) that computes only what changes its output: the same scores up to float
    rounding in the last place (the blend sums fewer columns); ``model`` is left as it is."""
    pruning = find_pruning(model)
    pruned = copy.deepcopy(model)
    for level in pruned.levels:
        level.last_gates = None
    apply_pruning(pruned, pruning)
    return pruned.eval()


def cost_record(unpruned: nn.Module, saved: nn.Module, sparse: Tensor, dense: Tensor) -> dict[str, dict[str, int]]:
    """``fused.json``'s ``cost``: FLOPs per row and parameters (``emm.train.cost``) of the model as trained and as
    saved, counted on the same real rows (moved to the model's device)."""
    device = next(iter(unpruned.parameters())).device
    sparse, dense = sparse.to(device), dense.to(device)
    return {"unpruned": model_cost(unpruned, sparse, dense).as_dict(),
            "saved": model_cost(saved, sparse, dense).as_dict()}
