"""Reading a model as a torch.fx graph, and cutting it into exact sub-graphs.

Symbolic tracing gives the model's *dataflow graph*, not just the order in which modules ran. That
is what a cut needs: from the graph we can prove that after a point exactly one tensor is still
needed downstream (so the model really is ``rest(prefix(x))``), and we can build each component as an
exact sub-graph (``fx.GraphModule``) that also keeps the parameter-free code (``torch.cat``,
``flatten``, residual ``+``, ``x0 * (W x + b)``) between modules. A custom sub-module whose own forward
cannot be traced (Python control flow on tensor values) is retried as an opaque leaf, which is always
semantically safe.

Where a cut goes
    For every cut-able layer (see ``emm.fusion.decompose.layers``) the cut is placed at the *latest*
    point before the next cut-able layer where exactly one value is still needed downstream and that
    value is a batch tensor computed from the layer. So a cut extends past trailing activations,
    dropout, normalisation, residual additions and concatenations, and components exchange
    *activations*. Consequences:

    - inside a DCN cross network ``x0`` stays live, so there is no cut until after the last cross
      layer; inside a residual block the skip tensor stays live, so the block is one piece;
    - an embedding lookup followed by ``cat([emb.flatten(1), dense])`` is cut after the ``cat``
      (the dense input is no longer needed there): the first level is the feature embedding;
    - model inputs needed later (e.g. ``dense`` used by the tower) invalidate every cut before;
    - the last cut-able layer is never cut after: the rest after the last cut is the model's head
      (task tower) and always contains at least that layer.

    Parameters used through functional code (``get_attr``) are not layers; they are copied into
    whichever component uses them. Weights tied (or a module called twice) *across* a cut become
    independent copies. Forward arguments that ``example_input`` does not supply are frozen to their
    defaults. Python branches on ``self.training`` inside traced (non-leaf) modules are frozen to
    their eval branch, because the model is traced in eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from emm.fusion.decompose.layers import LAYER_TYPES, Untraceable, has_params, hparams, is_norm, no_cut_reason
from emm.fusion.decompose.records import LayerSignature, Shape, TracedLayer, strip_batch
from emm.models.tracing import ThreadSafeTracing, reproduces


class _Tracer(ThreadSafeTracing, fx.Tracer):
    """fx tracer that treats some custom modules as leaves and remembers where tracing failed."""

    def __init__(self, extra_leaves: set[str]) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # subclasses of torch's own parametric layers (e.g. a faster Embedding) are still layers
        return (module_qualified_name in self.extra_leaves or isinstance(m, LAYER_TYPES)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.on_tracing_thread():  # another thread's model: not ours to record (see emm.models.tracing)
            return super().call_module(m, forward, args, kwargs)
        try:
            path = self.path_of_module(m)
        except NameError:
            path = type(m).__name__
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module the exception went through
                self.failed_in = path
            raise


class _Recorder(fx.Interpreter):
    """Runs the traced graph once and records every value's shape (None for non-tensors)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, Shape | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, Tensor) else None
        return out


def _static_nodes(order: Sequence[fx.Node], frozen: Sequence[fx.Node]) -> set[fx.Node]:
    """Values that depend on no input (parameters read by functional code, functions of them).

    They are not "live values" at a cut: each component that needs one recomputes it from its own
    copy of the parameter. ``frozen`` placeholders (forward arguments left at their defaults) count too.
    """
    static: set[fx.Node] = set(frozen)
    for n in order:
        if n.op == "get_attr" or (
            n.op in ("call_function", "call_method") and all(a in static for a in n.all_input_nodes)
        ):
            static.add(n)
    return static


class FxProgram:
    """A model as a torch.fx graph, with the liveness facts that decide where it can be cut."""

    method = "fx"

    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, Shape | None], inputs: tuple[Tensor, ...],
                 opaque: list[str]) -> None:
        self.gm = gm
        self.shapes = shapes
        self.opaque = opaque
        self.batch = inputs[0].shape[0]
        self.order = list(gm.graph.nodes)
        placeholders = [n for n in self.order if n.op == "placeholder"]
        # forward arguments the example batch does not supply run with their defaults: constants here
        self.frozen = {n: n.args[0] for n in placeholders[len(inputs):] if n.args}
        self.index = {n: i for i, n in enumerate(self.order)}
        self.static = _static_nodes(self.order, list(self.frozen))
        self.last_use = {n: max((self.index[u] for u in n.users), default=self.index[n]) for n in self.order}
        self.cut_values: dict[int, fx.Node] = {}  # cut position -> the one value live there
        self._layers = self._find_layers()

    @classmethod
    def read(cls, model: nn.Module, inputs: tuple[Tensor, ...], expected: Tensor) -> FxProgram:
        gm, opaque = _symbolic_trace(model)
        recorder = _Recorder(gm)
        try:
            with torch.no_grad():
                out = recorder.run(*inputs)
        except Exception as exc:
            reason = f"it fails on the example batch: {type(exc).__name__}: {exc}"
            raise Untraceable("the traced graph", reason) from exc
        if not reproduces(out, expected):
            reason = "it does not reproduce the model's output (state frozen at trace time)"
            raise Untraceable("the traced graph", reason)
        return cls(gm, recorder.shapes, inputs, opaque)

    # -- layers and cuts ------------------------------------------------------------------------

    def layers(self) -> list[TracedLayer]:
        return list(self._layers)

    def _find_layers(self) -> list[TracedLayer]:
        calls = [n for n in self.order if n.op == "call_module" and has_params(self._module(n))]
        cutters = [n for n in calls if not is_norm(self._module(n))]
        following = dict(zip(cutters, cutters[1:]))
        result = []
        for n in calls:
            module = self._module(n)
            reason = no_cut_reason(module, is_last=n not in following)
            position, shape = -1, None
            if reason is None:
                position, shape, reason = self._find_cut(n, following[n])
            result.append(TracedLayer(str(n.target), self._signature(n), shape, reason, position))
        return result

    def _find_cut(self, layer: fx.Node, following: fx.Node) -> tuple[int, Shape | None, str | None]:
        """Latest point before the next cut-able layer where one batch tensor from ``layer`` is all that's live."""
        lo, hi = self.index[layer], self.index[following] - 1
        for p in range(hi, lo - 1, -1):
            live = self._live(p)
            if len(live) == 1 and self._is_batch_tensor(live[0]) and self._depends_on(live[0], layer):
                self.cut_values[p] = live[0]
                return p, strip_batch(self.shapes[live[0]]), None
        names = ", ".join(self._value_name(v) for v in self._live(hi))
        return -1, None, f"more than the layer's own output is still needed after it ({names})"

    def _live(self, p: int) -> list[fx.Node]:
        return [
            n for n in self.order
            if n.op != "output" and n not in self.static and self.index[n] <= p < self.last_use[n]
        ]

    def _is_batch_tensor(self, n: fx.Node) -> bool:
        shape = self.shapes.get(n)
        return shape is not None and len(shape) >= 1 and shape[0] == self.batch

    def _depends_on(self, value: fx.Node, layer: fx.Node) -> bool:
        start = self.index[layer]
        stack, seen = [value], set()
        while stack:
            n = stack.pop()
            if n is layer:
                return True
            if n in seen or self.index[n] < start:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return False

    def _value_name(self, n: fx.Node) -> str:
        return f"input {n.target!r}" if n.op == "placeholder" else n.name

    def _module(self, n: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(n.target))

    def _signature(self, n: fx.Node) -> LayerSignature:
        module = self._module(n)
        ins = tuple(strip_batch(self.shapes[a]) for a in n.all_input_nodes if self.shapes.get(a) is not None)
        return LayerSignature(type(module).__name__, hparams(module), ins, strip_batch(self.shapes.get(n)))

    # -- building components ------------------------------------------------------------------

    def build(self, cuts: Sequence[int]) -> tuple[list[nn.Module], nn.Module, list[list[str]]]:
        bounds = [-1, *cuts, len(self.order) - 1]
        values = [self.cut_values[p] for p in cuts]
        sources: list[fx.Node | None] = [None, *values]
        targets: list[fx.Node | None] = [*values, None]
        pieces, modules = [], []
        for k in range(len(cuts) + 1):
            lo, hi = bounds[k] + 1, bounds[k + 1]
            name = "Head" if k == len(cuts) else f"Component{k}"
            pieces.append(self._segment(lo, hi, sources[k], targets[k], name))
            modules.append(_dedupe([str(n.target) for n in self.order[lo:hi + 1] if n.op == "call_module"]))
        return pieces[:-1], pieces[-1], modules

    def _segment(self, lo: int, hi: int, source: fx.Node | None, target: fx.Node | None, name: str) -> nn.Module:
        """Copy nodes lo..hi into their own graph; ``source`` becomes its input, ``target`` its output."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if source is not None:
            env[source] = graph.placeholder(source.name)

        def value(n: fx.Node) -> Any:
            if n in self.frozen:
                return self.frozen[n]
            if n not in env:  # only static values may come from before the segment: recompute them here
                assert n in self.static, f"{n.name} crosses a cut"
                env[n] = graph.node_copy(n, value)
            return env[n]

        for n in self.order[lo:hi + 1]:
            if n not in self.static:
                env[n] = graph.node_copy(n, value)
        if target is not None:
            graph.output(env[target])
        graph.lint()
        piece = copy.deepcopy(fx.GraphModule(self.gm, graph, class_name=name))
        return piece.eval()


def _symbolic_trace(model: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """fx-trace the model, turning custom sub-modules that fail to trace into opaque leaves."""
    opaque: set[str] = set()
    for _ in range(sum(1 for _ in model.modules()) + 1):
        tracer = _Tracer(opaque)
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            where = tracer.failed_in
            if where is None or where in opaque:
                what = f"module {where!r}" if where else f"the forward of {type(model).__name__}"
                raise Untraceable(what, f"{type(exc).__name__}: {_first_line(exc)}") from exc
            opaque.add(where)
            continue
        return fx.GraphModule(model, graph, class_name=type(model).__name__), sorted(opaque)
    raise Untraceable(f"the forward of {type(model).__name__}", "tracing did not converge")


def _dedupe(items: Sequence[str]) -> list[str]:
    """Order-preserving unique (a module called twice in one piece is listed once)."""
    return list(dict.fromkeys(items))


def _first_line(exc: BaseException) -> str:
    """The headline of a tracing error: fx errors carry long multi-line hints."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
