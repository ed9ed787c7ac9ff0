"""The Adaptive Knowledge Fusion (AKF) module: one level of the fused multi-task model (paper III-B).

One ``AKFLevel`` holds the level-k component of every pool model and, per task t:

Task gate (eq. 2, MoE within a task)
    ``G_t(g) = softmax(Linear(g))`` over task t's own components; ``h^t = sum_j G_tj(g) * h_j``.
Fusion gate (eq. 3)
    ``F_t(g) = softmax(Linear(g))`` over all T tasks. The most related *other* task is
    ``sel = argmax_{u != t} F_t(g)_u``: task t is masked out, so a task never selects itself.
    How ``h^sel`` enters MTM is the ``fusion_gate`` recipe (``emm.fusion.recipes.gate``: ``hard``, the
    paper, gives F_t no gradient; ``scaled`` and ``ste`` do).
MTM (eqs. 4-6)
    Self-attention over the pair ``[h^t, h^sel]`` with per-task ``Q``, ``K`` (Linear to ``qkv_dim`` +
    ReLU) and ``V`` (Linear back to the level width, so ``z^t`` can feed the next level's components):
    ``c_w = softmax_w(<query_w, K(w)> / sqrt(d))``, w in {h^t, h^sel}, where the query is the ``attention``
    recipe's (``emm.fusion.recipes.attention``: ``task_query`` asks with ``Q(h^t)``, ``self_score`` with
    ``Q(w)``).

    ``z^t = sum_w c_w V(w)``. ``V`` starts as the identity (weight I, bias 0), so at initialisation
    ``z^t`` is a convex mix of ``h^t`` and ``h^sel``: inputs of the kind the next level's frozen
    components were trained on. V ends in a ReLU only when every component of the level ends in one
    (non-negative activations); otherwise (e.g. the signed embedding level) V is linear, because a
    ReLU would throw away half of the signal. Without MTM (ablations ``baseline``/``+pretrained``)
    ``z^t = h^t`` and there is no fusion gate. A linear V is applied once, to ``sum_w c_w w``: the same ``z^t``
    (V is affine and the ``c_w`` sum to 1, so gradients agree too) at half the cost of V on both members.

Gate inputs ``g`` (what the caller passes; see ``emm.fusion.fused``)
    At level k >= 1 task t's gate input is its own input to the level, ``z^t`` of level k-1 (the
    paper's code gates on the level's input). At level 0 the components take the raw ``(sparse,
    dense)``, so the gate input is the fused model's shared (retrained) embedding output ``x``; when
    the caller passes no gate input (``embedding="reuse"``), it is the mean of the level-0 component
    outputs.

Inputs per task
    In the fused model each task's components receive *that task's* input: model i's level-k component
    is applied to ``z^{task(i)}`` of level k-1. ``forward`` therefore takes one input tuple per task.
    Components run one after another, in pool order, each as the ordinary module it is.

Frozen components
    With ``frozen=True`` every component parameter gets ``requires_grad=False`` and the components
    stay in eval mode whatever ``train()`` is called with, so Dropout never acts and BatchNorm
    running statistics never change. They stay ordinary sub-modules, so they are in ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from emm.errors import EMMError
from emm.fusion.decompose import Chain
from emm.fusion.recipes import ATTENTIONS, FUSION_GATES, Attention, FusionGate

_PASS_THROUGH = (nn.Dropout, nn.AlphaDropout, nn.Identity)
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = (F.relu, torch.relu, F.relu6)


# --------------------------------------------------------------------------------------------- #
# Multi-Task Merge
# --------------------------------------------------------------------------------------------- #


class MultiTaskMerge(nn.Module):
    """MTM (eqs. 4-6): attention over the pair ``[own, selected]`` -> ``z`` of the level width."""

    def __init__(self, width: int, qkv_dim: int, attention: str | Attention, value_relu: bool) -> None:
        super().__init__()
        self.scoring = ATTENTIONS.resolve(attention)
        self.attention = self.scoring.name
        self.qkv_dim = qkv_dim
        self.q = nn.Sequential(nn.Linear(width, qkv_dim), nn.ReLU())
        self.k = nn.Sequential(nn.Linear(width, qkv_dim), nn.ReLU())
        self.v = nn.Sequential(nn.Linear(width, width), nn.ReLU() if value_relu else nn.Identity())
        with torch.no_grad():  # V starts as the identity: z is a convex mix of the two inputs
            self.v[0].weight.copy_(torch.eye(width))
            self.v[0].bias.zero_()

    def forward(self, own: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
        """``own``, ``other``: [B, W]. Returns ``z`` [B, W] and the weights ``c`` [B, 2] (own, other)."""
        pair = torch.stack([own, other], dim=1)  # [B, 2, W]
        keys = self.k(pair)  # [B, 2, d]
        queries = self.scoring.queries(self.q, own, pair)  # [B, 1 or 2, d]
        scores = (queries * keys).sum(-1) / math.sqrt(self.qkv_dim)  # [B, 2]
        c = torch.softmax(scores, dim=-1)
        if type(self.v[1]) is nn.Identity:  # V affine, c sums to 1: V(c-mix) is the c-mix of V, for half V's work
            z = self.v(torch.einsum("bp,bpw->bw", c, pair))
        else:
            z = (c.unsqueeze(-1) * self.v(pair)).sum(dim=1)
        return z, c


# --------------------------------------------------------------------------------------------- #
# One AKF level
# --------------------------------------------------------------------------------------------- #


class AKFLevel(nn.Module):
    """One level of AKF: task gates, fusion gates, MTM over the level's components (see module doc).

    Args:
        components: model i's component of this level, for every pool model i (used as given: the
            caller copies them).
        component_tasks: task index (0..num_tasks-1) of each component's model.
        num_tasks: T.
        out_shape: the shape (without batch) every component outputs.
        gate_dim: width of the gate input ``g``.
        mtm: fuse across tasks (fusion gate + MTM); False gives ``z^t = h^t``.
        fusion_gate, attention: recipe names (``emm.fusion.recipes``) or recipe instances.
        qkv_dim: Q/K width (None: the level width).
        frozen: freeze the components (no grad, always eval).
        pre, post: optional per-component modules applied before/after it (``align="project"``
            adapters); trainable, kept out of the frozen set.
        index: the plan level this is (for reports).
    """

    def __init__(
        self,
        components: Sequence[nn.Module],
        component_tasks: Sequence[int],
        num_tasks: int,
        out_shape: Sequence[int],
        gate_dim: int,
        *,
        mtm: bool = True,
        fusion_gate: str | FusionGate = "scaled",
        attention: str | Attention = "task_query",
        qkv_dim: int | None = None,
        frozen: bool = True,
        pre: Sequence[nn.Module | None] | None = None,
        post: Sequence[nn.Module | None] | None = None,
        index: int = 0,
    ) -> None:
        super().__init__()
        self.gate_recipe = FUSION_GATES.resolve(fusion_gate)
        scoring = ATTENTIONS.resolve(attention)
        component_tasks = [int(t) for t in component_tasks]
        if len(component_tasks) != len(components) or not components:
            raise EMMError(
                f"AKF level {index}: got {len(components)} components and {len(component_tasks)} task indices; "
                "pass one task index per component"
            )
        members = [[i for i, t in enumerate(component_tasks) if t == task] for task in range(num_tasks)]
        empty = [t for t, m in enumerate(members) if not m]
        if empty or any(not 0 <= t < num_tasks for t in component_tasks):
            raise EMMError(
                f"AKF level {index}: every task needs at least one component and every component a task in "
                f"0..{num_tasks - 1}; tasks without components: {empty}"
            )
        if mtm and num_tasks < 2:
            raise EMMError(
                "cross-task fusion (MTM) needs at least two tasks; with one task use ablation '+pretrained' "
                "or 'baseline'"
            )
        if qkv_dim is not None and qkv_dim < 1:
            raise EMMError(f"qkv_dim must be a positive integer, got {qkv_dim}")
        self.index = index
        self.num_tasks = num_tasks
        self.component_tasks = component_tasks
        self.members = members
        self.out_shape = tuple(int(d) for d in out_shape)
        self.width = math.prod(self.out_shape)
        self.gate_dim = gate_dim
        self.mtm = mtm
        self.fusion_gate = self.gate_recipe.name
        self.attention = scoring.name
        self.frozen = frozen

        self.components = nn.ModuleList(components)
        self.pre = _optional_list(pre, len(components), "pre", index)
        self.post = _optional_list(post, len(components), "post", index)
        if frozen:
            for p in self.components.parameters():
                p.requires_grad_(False)
            self.components.eval()

        self.task_gates = nn.ModuleList(nn.Linear(gate_dim, len(m)) for m in members)
        self.value_relu = all(_ends_in_relu(c) for c in components) and all(p is None for p in post or [])
        if mtm:
            d = qkv_dim or self.width
            self.fusion_gates: nn.ModuleList | None = nn.ModuleList(nn.Linear(gate_dim, num_tasks)
                                                                     for _ in range(num_tasks))
            self.merges: nn.ModuleList | None = nn.ModuleList(
                MultiTaskMerge(self.width, d, scoring, self.value_relu) for _ in range(num_tasks))
        else:
            self.fusion_gates = None
            self.merges = None
        self.last_gates: dict[str, Any] | None = None

    # -- modes ----------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> AKFLevel:
        """Like ``nn.Module.train``, but frozen components stay in eval mode."""
        super().train(mode)
        if self.frozen:
            self.components.eval()
        return self

    # -- components -----------------------------------------------------------------------------

    def raw_outputs(self, inputs: Sequence[tuple[Tensor, ...]]) -> list[Tensor]:
        """Every component run on its task's input tuple (``inputs[t]``, through its ``pre`` adapter), before any
        ``post`` adapter: one output per component. Public because a pruned fused model hands level 0's to the
        donors' paths, whose first pieces are these very modules on the same raw inputs (``emm.fusion.prune``)."""
        if len(inputs) != self.num_tasks:
            raise EMMError(f"AKF level {self.index} expects one input per task ({self.num_tasks}), got {len(inputs)}")
        member_inputs = []
        for i, t in enumerate(self.component_tasks):
            args = inputs[t]
            if self.pre[i] is not None:
                args = (self.pre[i](*args),)
            member_inputs.append(tuple(args))
        return [component(*args) for component, args in zip(self.components, member_inputs)]

    def component_outputs(self, inputs: Sequence[tuple[Tensor, ...]],
                          raw: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Run every component on its task's input tuple (``inputs[t]``); one output per component. ``raw``:
        the components' outputs already computed (``raw_outputs``), then only the ``post`` adapters run."""
        outs = self.raw_outputs(inputs) if raw is None else list(raw)
        result = []
        for i, out in enumerate(outs):
            if self.post[i] is not None:
                out = self.post[i](out)
            result.append(out)
        return result

    # -- forward --------------------------------------------------------------------------------

    def forward(self, inputs: Sequence[tuple[Tensor, ...]], gate_inputs: Sequence[Tensor] | None = None,
                raw: Sequence[Tensor] | None = None) -> list[Tensor]:
        """``inputs[t]``: task t's input tuple for its components; ``gate_inputs[t]``: its gate input
        [B, gate_dim] (None: the mean of the component outputs, for every task); ``raw``: the components'
        outputs on these inputs when the caller computed them already (``raw_outputs``). Returns ``z^t``
        [B, *out_shape] per task. The gate values of this call are left in ``last_gates`` (detached):
        ``task`` (per task [B, m_t]), ``fusion`` ([T, B, T] probabilities), ``selected`` ([T, B] task
        index, never the row's own task) and ``attention`` ([T, B, 2] MTM weights of (own, selected));
        the last three are None without MTM."""
        outs = self.component_outputs(inputs, raw)
        flat = [o.reshape(o.shape[0], -1) for o in outs]
        if gate_inputs is None:
            mean = torch.stack(flat).mean(0)
            gate_inputs = [mean] * self.num_tasks
        gate_inputs = [g.reshape(g.shape[0], -1) for g in gate_inputs]
        if len(gate_inputs) != self.num_tasks:
            raise EMMError(f"AKF level {self.index} expects one gate input per task, got {len(gate_inputs)}")

        task_weights, fused = [], []
        for t in range(self.num_tasks):
            w = torch.softmax(self.task_gates[t](gate_inputs[t]), dim=-1)  # [B, m_t]
            stacked = torch.stack([flat[i] for i in self.members[t]], dim=1)  # [B, m_t, W]
            fused.append(torch.einsum("bm,bmw->bw", w, stacked))
            task_weights.append(w)
        gates: dict[str, Any] = {"task": [w.detach() for w in task_weights],
                                 "fusion": None, "selected": None, "attention": None}
        if not self.mtm:
            self.last_gates = gates
            return [h.reshape(h.shape[0], *self.out_shape) for h in fused]

        assert self.fusion_gates is not None and self.merges is not None
        H = torch.stack(fused, dim=1)  # [B, T, W]
        zs, probs_all, selected, attention = [], [], [], []
        for t in range(self.num_tasks):
            logits = self.fusion_gates[t](gate_inputs[t])  # [B, T]
            probs = torch.softmax(logits, dim=-1)
            masked = logits.detach().clone()
            masked[:, t] = float("-inf")
            sel = masked.argmax(dim=-1)  # never t
            z, c = self.merges[t](fused[t], self.gate_recipe.other(H, sel, probs))
            zs.append(z.reshape(z.shape[0], *self.out_shape))
            probs_all.append(probs.detach())
            selected.append(sel)
            attention.append(c.detach())
        gates["fusion"] = torch.stack(probs_all)  # [T, B, T]
        gates["selected"] = torch.stack(selected)  # [T, B]
        gates["attention"] = torch.stack(attention)  # [T, B, 2]: weight of (own, selected)
        self.last_gates = gates
        return zs

    def extra_repr(self) -> str:
        return (f"level={self.index}, tasks={self.num_tasks}, components={len(self.components)}, "
                f"out_shape={list(self.out_shape)}, gate_dim={self.gate_dim}, mtm={self.mtm}, "
                f"fusion_gate={self.fusion_gate!r}, attention={self.attention!r}, frozen={self.frozen}")


def _optional_list(mods: Sequence[nn.Module | None] | None, n: int, what: str, index: int) -> nn.ModuleList:
    if mods is None:
        return nn.ModuleList([None] * n)  # type: ignore[list-item]
    if len(mods) != n:
        raise EMMError(f"AKF level {index}: got {len(mods)} {what} modules for {n} components; pass one per component")
    return nn.ModuleList(mods)  # type: ignore[arg-type]


def _ends_in_relu(component: nn.Module) -> bool:
    """Whether the component's output is a ReLU's (possibly through Dropout/Identity): non-negative."""
    if isinstance(component, fx.GraphModule):
        node = next(n for n in reversed(component.graph.nodes) if n.op == "output").args[0]
        while isinstance(node, fx.Node):
            if node.op == "call_module":
                sub = component.get_submodule(node.target)
                if isinstance(sub, _RELU_MODULES):
                    return True
                if not isinstance(sub, _PASS_THROUGH):
                    return _ends_in_relu(sub) if not _is_leaf(sub) else False
            elif node.op == "call_function":
                if node.target in _RELU_FUNCTIONS:
                    return True
                if node.target is not F.dropout:
                    return False
            elif node.op == "call_method":
                if node.target in ("relu", "relu_"):
                    return True
                return False
            else:
                return False
            node = node.args[0] if node.args else None
        return False
    if isinstance(component, _RELU_MODULES):
        return True
    if isinstance(component, (nn.Sequential, Chain)):
        steps = list(component.steps) if isinstance(component, Chain) else list(component.children())
        for step in reversed(steps):
            if isinstance(step, _PASS_THROUGH):
                continue
            return _ends_in_relu(step)
    return False


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None
