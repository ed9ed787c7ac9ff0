"""The output head (``output``): what the fused model returns on top of its per-task towers.

``tower`` (the paper): the towers' logits, nothing else.
``donor_residual``: each task's frozen donors kept whole (``emm.fusion.blend``: why, and the modules), their
    per-task blend, plus the towers as a residual whose last layer starts at zero, so at step 0 the fused
    model *is* the blend. Its ``prepare`` fits the blend as the donor stack on validation rows.
``cross_residual``: as ``donor_residual``, but every donor's logit may enter every task's blend (the cross-task
    stack), so a task with scarce labels can lean on a rich task's
    donor that predicts it. Both heads fit each task on its labelled held-out rows only (NaN = no label).

A head builds the modules it needs (registered on the model under the names it returns: the state-dict names)
and is handed the model back to run them. The model is ``emm.fusion.fused.FusedModel``, typed ``Any`` here
because that module imports this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from emm.errors import EMMError
from emm.fusion.blend import DonorBlend, DonorPaths, OutputMember, fit_stack
from emm.fusion.decompose import Plan
from emm.fusion.recipes.base import Recipe, Registry


class OutputHead(Recipe):
    """What the fused model's logits are, given its towers' logits.

    Two class facts the fuse plan (``emm.fusion.procedure.FusePlan``) reads, so the procedure never asks which
    head a model has: ``prepares`` (``prepare`` fits something on held-out rows, worth loading them for) and
    ``scores_at_start`` (the untrained model is already a model worth keeping, so training scores it as epoch 0
    and early stopping may hand it back).
    """

    prepares: ClassVar[bool] = False
    scores_at_start: ClassVar[bool] = False

    def build(self, plan: Plan, model_tasks: Sequence[str], task_names: Sequence[str], towers: nn.ModuleList,
              outputs: Sequence[OutputMember] = ()) -> dict[str, nn.Module]:
        """The head's own modules, by the attribute name the model keeps them under (may adjust ``towers``);
        ``outputs``: the members that join at the output (tree models), which only a donor head can take."""
        if outputs:
            raise EMMError(f"pool model(s) {[m.name for m in outputs]} are tree models, which join the fused model as "
                           f"donors in its tasks' blends, and output {self.name!r} keeps no donors; set fuse.output "
                           "to donor_residual (or cross_residual), or leave the tree models out of the pool")
        return {}

    def logits(self, model: Any, towers: Tensor, sparse: Tensor, dense: Tensor) -> Tensor:
        """``[B, T]``: the model's output from its towers' ``[B, T]`` (a pruned model's towers that output exactly 0
        are not run: their columns come as zeros, ``emm.fusion.prune``)."""
        return towers

    def donor_logits(self, model: Any, sparse: Tensor, dense: Tensor,
                     level0: Sequence[Tensor] | None = None) -> Tensor:
        """``[B, n_models]``: every donor's own logit, for a head that keeps the donors (pruned: the kept donors')."""
        raise EMMError(f"this fused model keeps no donors (output={self.name!r}); build it with "
                       "output='donor_residual' or 'cross_residual'")

    def pool_modules(self, model: Any) -> list[nn.Module]:
        """Pool-derived modules of the head that a fine-tune phase thaws (``FusedModel.unfreeze_pool``)."""
        return []

    def prepare(self, model: Any, sparse: Tensor, dense: Tensor, labels: Tensor, *,
                batch_size: int = 65536) -> dict[str, dict[str, float]] | None:
        """Fit what the head fits on held-out rows before training; a record for ``fused.json``, or None when
        the head has nothing to fit."""
        return None

    def start_state(self, model: Any) -> dict[str, Tensor]:
        """What ``restore_start`` needs to put a task back to its step-0 output (a head whose step 0 is a model)."""
        raise EMMError(f"output {self.name!r} has no step-0 model to go back to")

    def restore_start(self, model: Any, task: int, state: dict[str, Tensor]) -> None:
        """Make task ``task``'s output what it was at step 0 (``state`` from ``start_state``); other tasks untouched."""
        raise EMMError(f"output {self.name!r} has no step-0 model to go back to")


OUTPUTS: Registry[OutputHead] = Registry("output", OutputHead)


@OUTPUTS.register("tower")
class TowerOutput(OutputHead):
    pass


@OUTPUTS.register("donor_residual")
class DonorResidualOutput(OutputHead):
    """Owns ``donors`` (``DonorPaths``) and ``blend`` (``DonorBlend``) on the model. At step 0 the model is the
    donors' blend (the residual starts at zero), and ``prepare`` fits that blend as the donor stack."""

    prepares: ClassVar[bool] = True
    scores_at_start: ClassVar[bool] = True
    cross: ClassVar[bool] = False  # may every donor enter every task's blend (``DonorBlend(cross=...)``)?

    def build(self, plan: Plan, model_tasks: Sequence[str], task_names: Sequence[str], towers: nn.ModuleList,
              outputs: Sequence[OutputMember] = ()) -> dict[str, nn.Module]:
        tasks = [*model_tasks, *(m.task for m in outputs)]  # the trees' columns after the networks'
        modules = {"donors": DonorPaths(plan, outputs), "blend": DonorBlend(tasks, task_names, cross=self.cross)}
        for tower in towers:  # the residual starts at zero: at step 0 the model is the donors' blend
            nn.init.zeros_(tower.net[-1].weight)
            nn.init.zeros_(tower.net[-1].bias)
        return modules

    def logits(self, model: Any, towers: Tensor, sparse: Tensor, dense: Tensor,
               level0: Sequence[Tensor] | None = None) -> Tensor:
        """As the base's; ``level0``: AKF level 0's component outputs, handed to the donors when a pruned model
        shares them (``DonorPaths.shares_first``)."""
        return towers + model.blend(self.donor_logits(model, sparse, dense, level0))

    def donor_logits(self, model: Any, sparse: Tensor, dense: Tensor,
                     level0: Sequence[Tensor] | None = None) -> Tensor:
        return model.donors(sparse, dense, first=level0)

    def pool_modules(self, model: Any) -> list[nn.Module]:
        """The donors' network paths: a tree member's leaf values are what its library fitted, never fine-tuned."""
        return [model.donors.paths]

    def start_state(self, model: Any) -> dict[str, Tensor]:
        """The blend's weights and bias (the donors are frozen, so with them they are the whole step-0 model)."""
        return {"weight": model.blend.weight.detach().clone(), "bias": model.blend.bias.detach().clone()}

    @torch.no_grad()
    def restore_start(self, model: Any, task: int, state: dict[str, Tensor]) -> None:
        """Task ``task`` back to its step-0 output exactly: its blend row restored and its tower's last layer zeroed
        (the residual is then 0 whatever the shared AKF levels compute). Other tasks' rows and towers are their own
        parameters, so they keep what training gave them."""
        model.blend.weight[task].copy_(state["weight"][task])
        model.blend.bias[task].copy_(state["bias"][task])
        last = model.towers[task].net[-1]
        last.weight.zero_()
        last.bias.zero_()

    @torch.no_grad()
    def prepare(self, model: Any, sparse: Tensor, dense: Tensor, labels: Tensor, *,
                batch_size: int = 65536) -> dict[str, dict[str, float]]:
        """The blend set to the stack fitted on these (validation) rows; ``labels`` ``[N, T]`` in the model's task
        order, NaN where a row has no label for a task: each task is fitted on its labelled rows only, and a task
        with none (or a single class) is refused by name. Returns per task the fitted weights named by donor, the
        bias and ``labelled_rows``. Deterministic, so every DDP rank given the same rows fits the same blend."""
        blend, donors = model.blend, model.donors
        logits = torch.cat([donors(sparse[i:i + batch_size], dense[i:i + batch_size])
                            for i in range(0, len(sparse), batch_size)]).cpu().numpy()
        labels_np = labels.detach().cpu().double().numpy().reshape(len(logits), -1)
        fitted = {}
        for t, task in enumerate(model.task_names):
            members = blend.members(t)
            y = labels_np[:, t]
            weights, bias, extra = self.fit_task(logits[:, members], y, task)
            blend.set_task(t, weights, bias)
            fitted[task] = {**{model.donor_names[i]: float(w) for i, w in zip(members, weights)}, "bias": bias,
                            "labelled_rows": int((~np.isnan(y)).sum()), **extra}
        return fitted

    def fit_task(self, logits: np.ndarray, labels: np.ndarray, task: str) -> tuple[np.ndarray, float, dict[str, Any]]:
        """One task's stack on its blend's donor logits ``[N, members]`` (labels NaN = no label): weights, bias and
        anything else worth recording."""
        weights, bias = fit_stack(logits, labels, task=task)
        return weights, bias, {}


@OUTPUTS.register("cross_residual")
class CrossResidualOutput(DonorResidualOutput):
    """``donor_residual`` with a full blend mask: every donor may enter every task's blend (``DonorBlend(cross=True)``;
    the state-dict names are the same). ``prepare`` fits each task's blend as the cross-task stack: the donor
    stack's own fit (``fit_stack``) over every donor's logit, on the task's labelled held-out rows."""

    cross: ClassVar[bool] = True
