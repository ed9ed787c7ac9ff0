"""The MTM attention (``attention``, eq. 6): how the pair ``[h^t, h^sel]`` is scored.

``c_w = softmax_w(<query_w, K(w)> / sqrt(d))`` for w in {h^t, h^sel}; the modes differ in the query:

- ``task_query``: ``query_w = Q(h^t)`` for both members. Task t asks how much of itself and of the selected
  task it wants.
- ``self_score``: eq. (6) read literally, ``query_w = Q(w)``: each member scores itself, with no reference to
  the task asking.
"""

from __future__ import annotations

from torch import Tensor, nn

from emm.fusion.recipes.base import Recipe, Registry


class Attention(Recipe):
    """One way MTM forms its queries."""

    def queries(self, q: nn.Module, own: Tensor, pair: Tensor) -> Tensor:
        """``q``: the task's query network; ``own`` [B, W]; ``pair`` [B, 2, W] (own, selected). Returns queries
        that broadcast against the keys [B, 2, d]: [B, 1, d] or [B, 2, d]."""
        raise NotImplementedError


ATTENTIONS: Registry[Attention] = Registry("attention", Attention)


@ATTENTIONS.register("task_query")
class TaskQuery(Attention):
    def queries(self, q: nn.Module, own: Tensor, pair: Tensor) -> Tensor:
        return q(own).unsqueeze(1)


@ATTENTIONS.register("self_score")
class SelfScore(Attention):
    def queries(self, q: nn.Module, own: Tensor, pair: Tensor) -> Tensor:
        return q(pair)
