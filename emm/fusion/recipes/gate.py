"""The fusion gate (``fusion_gate``, eq. 3): how the selected other task's output ``h^sel`` enters MTM.

Every mode selects the same task, ``sel = argmax_{u != t} F_t(g)_u`` (``emm.fusion.akf`` picks it); they
differ in what reaches MTM and so in whether ``F_t`` learns:

- ``hard`` (the paper): ``h^sel`` as is. argmax has no gradient, so F_t never learns; with two tasks the
  choice is forced anyway (the only other task), so F_t is dead weight there.
- ``scaled``: ``F_t(g)_sel * h^sel``; the selection is still hard, but F_t gets a gradient through the
  probability of the chosen task. With two tasks this learns *how much* of the other task to take
  (``F_t(g)_other = 1 - F_t(g)_t``).
- ``ste``: straight-through one-hot. Forward: exactly ``h^sel``. Backward: as if the output were
  ``sum_u F_t(g)_u * h^u`` over all tasks (task t's own entry has weight 0 in the forward pass, but keeping
  it in the surrogate is what gives F_t a gradient when T = 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from emm.fusion.recipes.base import Recipe, Registry


class FusionGate(Recipe):
    """One way the selected task's output enters MTM."""

    def other(self, H: Tensor, sel: Tensor, probs: Tensor) -> Tensor:
        """``H`` [B, T, W]: every task's fused output; ``sel`` [B]: the selected task (never the row's own);
        ``probs`` [B, T]: the fusion gate's softmax. Returns what MTM pairs with the task's own output, [B, W]."""
        raise NotImplementedError


FUSION_GATES: Registry[FusionGate] = Registry("fusion_gate", FusionGate)


def _selected(H: Tensor, sel: Tensor) -> Tensor:
    return H[torch.arange(H.shape[0], device=H.device), sel]


@FUSION_GATES.register("hard")
class HardGate(FusionGate):
    def other(self, H: Tensor, sel: Tensor, probs: Tensor) -> Tensor:
        return _selected(H, sel)


@FUSION_GATES.register("scaled")
class ScaledGate(FusionGate):
    def other(self, H: Tensor, sel: Tensor, probs: Tensor) -> Tensor:
        return _selected(H, sel) * probs.gather(1, sel.unsqueeze(1))


@FUSION_GATES.register("ste")
class StraightThroughGate(FusionGate):
    def other(self, H: Tensor, sel: Tensor, probs: Tensor) -> Tensor:
        one_hot = F.one_hot(sel, H.shape[1]).to(probs.dtype)  # forward one-hot, backward softmax
        weights = one_hot + probs - probs.detach()
        return torch.einsum("bt,btw->bw", weights, H)
