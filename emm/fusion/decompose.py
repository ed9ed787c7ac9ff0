"""Algorithm 1 of the EMM paper: cut trained single-task models into aligned hierarchical components.

Given a pool of trained models (possibly of different structures), find the layers whose structure
every model shares, in order, and cut every model after each of them. Every model then becomes the
same number L of components plus a *head* (its task tower); components of the same level have the
same input/output shapes across models, which is what lets the AKF fusion module mix them.

How a model is read
    **torch.fx first.** Symbolic tracing gives the model's *dataflow graph*, not just the order in
    which modules ran. That is what a cut needs: from the graph we can prove that after a point
    exactly one tensor is still needed downstream (so the model really is ``rest(prefix(x))``), and
    we can build each component as an exact sub-graph (``fx.GraphModule``) that also keeps the
    parameter-free code (``torch.cat``, ``flatten``, residual ``+``, ``x0 * (W x + b)``) between
    modules. A custom sub-module whose own forward cannot be traced (Python control flow on tensor
    values) is retried as an opaque leaf, which is always semantically safe.
    **Forward hooks as the fallback.** If the model's own forward cannot be traced, we record the
    calls of its leaf modules on the example batch. That is only a faithful description when the
    leaves run strictly as a chain (each leaf receives exactly the previous leaf's output object and
    the last one's output *is* the model output, e.g. ``nn.Sequential``), so that is verified, and the
    rebuilt chain must reproduce the output. Hooks cannot see Python branches: a chain verified on
    the example batch is trusted for other batches too. If neither works, an ``EMMError`` names the
    model and the module that could not be traced.

Which layers, and where a cut goes
    Layers are leaf modules that own parameters (Linear, Embedding, BatchNorm, Conv, ...); their
    *structural signature* is the module type, its constructor hyper-parameters (``extra_repr``) and
    the input/output shapes seen on the example batch (batch dimension dropped).
    Normalisation layers (BatchNorm, LayerNorm, GroupNorm, ...) are signed but never cut after: they
    belong to the block of the layer before them, like the paper's Linear+BN+ReLU+Dropout blocks.
    For every other layer the cut is placed at the *latest* point before the next cut-able layer
    where exactly one value is still needed downstream and that value is a batch tensor computed
    from the layer. So a cut extends past trailing activations, dropout, normalisation, residual
    additions and concatenations, and components exchange *activations*. Consequences:
    - inside a DCN cross network ``x0`` stays live, so there is no cut until after the last cross
      layer; inside a residual block the skip tensor stays live, so the block is one piece;
    - an embedding lookup followed by ``cat([emb.flatten(1), dense])`` is cut after the ``cat``
      (the dense input is no longer needed there): the first level is the feature embedding;
    - model inputs needed later (e.g. ``dense`` used by the tower) invalidate every cut before;
    - the last cut-able layer is never cut after: the rest after the last cut is the model's head
      (task tower) and always contains at least that layer.
    Parameters used through functional code (``get_attr``) are not layers; they are copied into
    whichever component uses them. Weights tied (or a module called twice) *across* a cut become
    independent copies. Forward arguments that ``example_input`` does not supply are frozen to
    their defaults.

Alignment (``align="identical"``, the paper's setting)
    The common layers are an order-preserving intersection: iterative pairwise longest common
    subsequence over the models' sequences of cut-valid layers, keyed by (signature, cut shape). The
    result is a common subsequence of every model; each model is cut after the leftmost match of
    each common layer, so layers with no counterpart stay inside their component. With a single
    model the "intersection" is the model itself: it is cut at all its valid cut points.

Projection (``align="project"``, beyond the paper)
    The paper's stated limitation is that models must share identical layers. With
    ``align="project"`` models are cut at equal relative depth among their cut points with a 1-D cut
    tensor (``L`` = the smallest such count, or ``levels``), each level gets a target width (the
    widest model's), and ``plan.adapters[i][k]`` is a trainable ``nn.Linear`` from model i's width to
    it (``plan.adapt``), with ``plan.inverse_adapters`` mapping back (``plan.unadapt``). Adapters are
    initialised as zero-padding / truncation, so ``unadapt(adapt(h)) == h`` exactly until trained.

Exactness
    Components are deep copies (they share parameters with nothing, so they can be frozen one by
    one), built from the model in eval mode and returned in eval mode. Running a model's components
    one after another, then its head, reproduces the model's output bit for bit (``torch.equal``);
    this is checked on the example batch for every model before a plan is returned. Python branches
    on ``self.training`` inside traced (non-leaf) modules are frozen to their eval branch.
"""

from __future__ import annotations

import dataclasses

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, fx, nn

from emm.errors import EMMError

Shape = tuple[int, ...]
ALIGN_MODES = ("identical", "project")
PLAN_FORMAT = "emm.plan/1"

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


# --------------------------------------------------------------------------------------------- #
# Public records
# --------------------------------------------------------------------------------------------- #


@dataclass(frozen=True)
class LayerSignature:
    """What makes two layers "the same layer" for Algorithm 1 (shapes exclude the batch dim)."""

    type: str
    hparams: str
    in_shapes: tuple[Shape, ...]
    out_shape: Shape | None

    def describe(self) -> str:
        ins = ", ".join(_fmt_shape(s) for s in self.in_shapes)
        return f"{self.type}({self.hparams}) {ins}->{_fmt_shape(self.out_shape)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "hparams": self.hparams,
            "in_shapes": [list(s) for s in self.in_shapes],
            "out_shape": None if self.out_shape is None else list(self.out_shape),
        }


@dataclass(frozen=True)
class TracedLayer:
    """One signed layer of a traced model, and whether (and with what tensor) it can be cut after.

    ``cut_shape`` is the shape of the tensor handed to the next component when the model is cut
    after this layer, or None when no cut is valid there; ``no_cut`` then says why.
    """

    name: str
    signature: LayerSignature
    cut_shape: Shape | None
    no_cut: str | None
    position: int  # internal: where in the traced program the cut goes (-1: none)

    @property
    def key(self) -> tuple[LayerSignature, Shape | None]:
        """Alignment key: same layer *and* same tensor at the cut, so levels exchange equal shapes."""
        return (self.signature, self.cut_shape)

    def describe(self) -> str:
        cut = f" => {_fmt_shape(self.cut_shape)}" if self.cut_shape is not None else ""
        return f"{self.name}: {self.signature.describe()}{cut}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "signature": self.signature.to_dict(),
            "cut_shape": None if self.cut_shape is None else list(self.cut_shape),
            "no_cut": self.no_cut,
        }


@dataclass(frozen=True)
class Span:
    """One model's share of a level (or its head): which modules it runs, and its size."""

    model: str
    layers: tuple[str, ...]  # qualified names of the leaf modules the component calls, in order
    cut_layer: str | None  # the layer the component ends after (None for a head)
    num_params: int
    in_shapes: tuple[Shape, ...]
    out_shape: Shape | None

    def layer_range(self) -> str:
        if not self.layers:
            return "-"
        if len(self.layers) == 1:
            return self.layers[0]
        return f"{self.layers[0]} .. {self.layers[-1]} ({len(self.layers)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "layers": list(self.layers),
            "cut_layer": self.cut_layer,
            "num_params": self.num_params,
            "in_shapes": [list(s) for s in self.in_shapes],
            "out_shape": None if self.out_shape is None else list(self.out_shape),
        }


@dataclass(frozen=True)
class Level:
    """Level k: the common layer every model is cut after, and each model's component."""

    index: int
    signature: LayerSignature | None  # None with align="project" (no layer is common)
    in_shapes: tuple[Shape, ...]
    out_shape: Shape  # shape the level's components hand on (the target width with "project")
    spans: tuple[Span, ...]
    target_width: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.index,
            "signature": None if self.signature is None else self.signature.to_dict(),
            "in_shapes": [list(s) for s in self.in_shapes],
            "out_shape": list(self.out_shape),
            "target_width": self.target_width,
            "models": [s.to_dict() for s in self.spans],
        }


@dataclass
class ModelTrace:
    """A model read into signed layers, plus what is needed to cut it (see ``trace_model``)."""

    name: str
    model_type: str
    method: str  # "fx" or "hooks"
    layers: list[TracedLayer]
    opaque: list[str]  # sub-modules fx could not trace into, kept whole
    input_shapes: tuple[Shape, ...]
    expected: Tensor  # the model's eval-mode output on the example batch
    graph: _Program

    def cut_valid(self) -> list[TracedLayer]:
        return [layer for layer in self.layers if layer.cut_shape is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "model_type": self.model_type,
            "method": self.method,
            "opaque_modules": list(self.opaque),
            "layers": [layer.to_dict() for layer in self.layers],
        }


@dataclass
class Plan:
    """The result of ``decompose``: per model L components and a head, and per level a description.

    ``components[i][k]`` is model i's level-k component (the first takes ``*example_input``, the
    others one tensor); ``heads[i]`` maps the last component's output to model i's output, so
    ``heads[i](components[i][-1](...components[i][0](*x)))`` equals ``models[i](*x)`` exactly.
    """

    names: list[str]
    align: str
    input_shapes: tuple[Shape, ...]
    levels: list[Level]
    components: list[list[nn.Module]]
    heads: list[nn.Module]
    head_spans: list[Span]
    traces: list[ModelTrace]
    adapters: nn.ModuleList | None = None
    inverse_adapters: nn.ModuleList | None = None
    head: str | None = None  # the sub-module name never cut into (see decompose)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    @property
    def num_models(self) -> int:
        return len(self.names)

    def forward_model(self, i: int, *inputs: Tensor) -> Tensor:
        """Run model i as its components then its head (no adapters): equals ``models[i](*inputs)``."""
        h = self.components[i][0](*inputs)
        for component in self.components[i][1:]:
            h = component(h)
        return self.heads[i](h)

    def adapt(self, i: int, level: int, h: Tensor) -> Tensor:
        """Map model i's level output to the level's common width (identity with align="identical")."""
        return h if self.adapters is None else self.adapters[i][level](h)

    def unadapt(self, i: int, level: int, h: Tensor) -> Tensor:
        """Map a common-width tensor back to model i's own width at that level (inverse of adapt)."""
        return h if self.inverse_adapters is None else self.inverse_adapters[i][level](h)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description; ``emm.fusion.store`` re-derives and compares against it."""
        adapters = None
        if self.adapters is not None:
            adapters = [
                [{"level": k, "in_features": a.in_features, "out_features": a.out_features}
                 for k, a in enumerate(per_model)]
                for per_model in self.adapters
            ]
        return {
            "format": PLAN_FORMAT,
            "align": self.align,
            "head": self.head,
            "models": list(self.names),
            "num_levels": self.num_levels,
            "input_shapes": [list(s) for s in self.input_shapes],
            "levels": [level.to_dict() for level in self.levels],
            "heads": [span.to_dict() for span in self.head_spans],
            "adapters": adapters,
            "traces": [trace.to_dict() for trace in self.traces],
        }

    def report(self) -> str:
        """A readable table: level, common layer, per model the layer range and parameter count."""
        rows: list[tuple[str, ...]] = [("level", "common layer", "out", "model", "layers", "params")]
        for level in self.levels:
            common = level.signature.describe() if level.signature is not None else "(projected)"
            for j, span in enumerate(level.spans):
                first = j == 0
                rows.append((
                    str(level.index) if first else "",
                    common if first else "",
                    _fmt_shape(level.out_shape) if first else "",
                    span.model,
                    span.layer_range(),
                    f"{span.num_params:,}",
                ))
        for j, span in enumerate(self.head_spans):
            rows.append(("head" if j == 0 else "", "", "", span.model, span.layer_range(),
                         f"{span.num_params:,}"))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = [f"EMM plan: {self.num_models} model(s), {self.num_levels} level(s), align={self.align}"]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------------------------- #


def decompose(
    models: Sequence[nn.Module],
    example_input: tuple[Tensor, ...] | Tensor,
    *,
    names: Sequence[str] | None = None,
    align: str = "identical",
    levels: int | None = None,
    head: str | None = None,
) -> Plan:
    """Algorithm 1: cut every model after each common layer into L aligned components plus a head.

    ``example_input`` is one batch in the models' calling convention, e.g. ``(sparse, dense)``;
    it fixes the shapes in the signatures. ``levels`` is only for ``align="project"``. ``head`` is a
    sub-module name (e.g. ``"tower"``): no cut is made inside it, so each model's head is at least that
    whole module (identical tower layers would otherwise become a level of their own).
    """
    inputs = as_inputs(example_input)
    names = _check_names(models, names)
    _check_align(align, levels)
    traces = [trace_model(model, inputs, name=name, head=head) for model, name in zip(models, names)]
    plan = plan_from_traces(traces, inputs, align=align, levels=levels)
    plan.head = head
    return plan


def trace_model(model: nn.Module, example_input: tuple[Tensor, ...] | Tensor, *, name: str = "model",
                head: str | None = None) -> ModelTrace:
    """Read one model into signed layers and cut points (fx, else forward hooks), in eval mode.

    Layers inside the sub-module ``head`` are signed but never cut after."""
    inputs = as_inputs(example_input)
    with _eval_mode(model):
        expected = _run_example(model, inputs, name)
        program = _read_program(model, inputs, expected, name)
    layers = program.layers()
    if head:
        layers = [dataclasses.replace(layer, cut_shape=None, no_cut=f"inside the head module {head!r}")
                  if layer.name == head or layer.name.startswith(f"{head}.") else layer for layer in layers]
    return ModelTrace(
        name=name,
        model_type=type(model).__name__,
        method=program.method,
        layers=layers,
        opaque=list(program.opaque),
        input_shapes=tuple(_strip_batch(tuple(x.shape)) for x in inputs),
        expected=expected,
        graph=program,
    )


def plan_from_traces(
    traces: Sequence[ModelTrace], inputs: tuple[Tensor, ...], *, align: str = "identical", levels: int | None = None
) -> Plan:
    """Align traced models, cut them, build components/heads/adapters and check exactness."""
    _check_align(align, levels)
    if align == "identical":
        chosen, common = _align_identical(traces)
        targets: list[int] | None = None
    else:
        chosen, targets = _align_project(traces, levels)
        common = None
    components: list[list[nn.Module]] = []
    heads: list[nn.Module] = []
    per_model_spans: list[list[Span]] = []
    for trace, cuts in zip(traces, chosen):
        pieces, head, modules = trace.graph.build([layer.position for layer in cuts])
        _check_exact(trace, pieces, head, inputs)
        components.append(pieces)
        heads.append(head)
        per_model_spans.append(_spans(trace, cuts, pieces, head, modules))
    level_list = _levels(traces, chosen, common, targets, per_model_spans)
    plan = Plan(
        names=[t.name for t in traces],
        align=align,
        input_shapes=traces[0].input_shapes,
        levels=level_list,
        components=components,
        heads=heads,
        head_spans=[spans[-1] for spans in per_model_spans],
        traces=list(traces),
    )
    if targets is not None:
        plan.adapters, plan.inverse_adapters = _build_adapters(chosen, targets)
    return plan


def as_inputs(example_input: tuple[Tensor, ...] | Tensor) -> tuple[Tensor, ...]:
    """Normalise and check the example batch: a non-empty tuple of tensors with one batch size."""
    if isinstance(example_input, Tensor):
        example_input = (example_input,)
    if not isinstance(example_input, (tuple, list)) or not example_input:
        raise EMMError(
            f"example_input must be a tuple of tensors such as (sparse, dense), got {type(example_input).__name__}; "
            "pass one batch from the training data"
        )
    if not all(isinstance(x, Tensor) for x in example_input):
        kinds = ", ".join(type(x).__name__ for x in example_input)
        raise EMMError(f"example_input must contain only tensors, got ({kinds}); pass one batch from the training data")
    sizes = {x.shape[0] if x.dim() else None for x in example_input}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        shapes = ", ".join(_fmt_shape(tuple(x.shape)) for x in example_input)
        raise EMMError(
            f"example_input tensors must share a non-zero batch dimension, got shapes {shapes}; "
            "pass one batch (same rows for every tensor) from the training data"
        )
    return tuple(example_input)


# --------------------------------------------------------------------------------------------- #
# Checks on the models and the example batch
# --------------------------------------------------------------------------------------------- #


def _check_names(models: Sequence[nn.Module], names: Sequence[str] | None) -> list[str]:
    if not models:
        raise EMMError("decompose needs at least one trained model; got none")
    for i, model in enumerate(models):
        if not isinstance(model, nn.Module):
            raise EMMError(f"models[{i}] is a {type(model).__name__}, not a torch nn.Module; pass the trained models")
    if names is None:
        return [f"model{i}" for i in range(len(models))]
    names = [str(n) for n in names]
    if len(names) != len(models):
        raise EMMError(f"got {len(names)} names for {len(models)} models; pass one name per model")
    if len(set(names)) != len(names):
        raise EMMError(f"model names must be unique, got {names}")
    return names


def _check_align(align: str, levels: int | None) -> None:
    if align not in ALIGN_MODES:
        raise EMMError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")
    if levels is not None and align != "project":
        raise EMMError("levels= only applies to align='project'; with align='identical' the common layers fix it")
    if levels is not None and levels < 1:
        raise EMMError(f"levels must be at least 1, got {levels}")


def _run_example(model: nn.Module, inputs: tuple[Tensor, ...], name: str) -> Tensor:
    """Run the model once; its failure or a non-batch output is the user's mistake, so say which."""
    try:
        with torch.no_grad():
            out = model(*inputs)
    except Exception as exc:
        raise EMMError(
            f"model {name!r} ({type(model).__name__}) failed on example_input "
            f"({_describe_inputs(inputs)}): {type(exc).__name__}: {exc}. Pass a batch in the layout this model "
            "was trained on (same number of tensors, feature counts and dtypes)"
        ) from exc
    batch = inputs[0].shape[0]
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != batch:
        got = _fmt_shape(tuple(out.shape)) if isinstance(out, Tensor) else type(out).__name__
        raise EMMError(
            f"model {name!r} ({type(model).__name__}) returned {got} for a batch of {batch} rows; decompose needs "
            "single-task models returning one tensor with the batch first (logits [B, 1])"
        )
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode while reading the model, then each sub-module's own flag back (mixed modes survive)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _check_exact(trace: ModelTrace, pieces: list[nn.Module], head: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    with torch.no_grad():
        h = pieces[0](*inputs)
        for piece in pieces[1:]:
            h = piece(h)
        out = head(h)
    if not (isinstance(out, Tensor) and out.shape == trace.expected.shape and torch.equal(out, trace.expected)):
        raise EMMError(
            f"model {trace.name!r} ({trace.model_type}): its components do not reproduce its output on the example "
            "batch; its forward probably depends on state the trace froze (Python globals, randomness in eval "
            "mode). Make the forward deterministic in eval mode"
        )


# --------------------------------------------------------------------------------------------- #
_LAYER_TYPES = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd,
                nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


# Reading a model: torch.fx program, or a hook-verified chain of leaf modules
# --------------------------------------------------------------------------------------------- #


class _Program(Protocol):
    method: str
    opaque: list[str]

    def layers(self) -> list[TracedLayer]: ...

    def build(self, cuts: Sequence[int]) -> tuple[list[nn.Module], nn.Module, list[list[str]]]: ...


class _Untraceable(Exception):
    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def _read_program(model: nn.Module, inputs: tuple[Tensor, ...], expected: Tensor, name: str) -> _Program:
    try:
        return _FxProgram.read(model, inputs, expected)
    except _Untraceable as fx_failure:
        try:
            return _ChainProgram.read(model, inputs, expected)
        except _Untraceable as chain_failure:
            raise EMMError(
                f"model {name!r} ({type(model).__name__}) cannot be decomposed: torch.fx could not trace "
                f"{fx_failure.where} ({fx_failure.reason}), and the forward-hook fallback does not apply "
                f"({chain_failure}). Make that forward traceable (no Python `if`/`for` on tensor values; "
                "use torch.where), or build the model as an nn.Sequential chain of modules"
            ) from fx_failure


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES)


def _hparams(module: nn.Module) -> str:
    """Constructor hyper-parameters as torch prints them; parameter shapes for modules that print none."""
    text = module.extra_repr()
    if text:
        return text
    return ", ".join(f"{n}={tuple(p.shape)}" for n, p in module.named_parameters())


def _strip_batch(shape: Shape | None) -> Shape | None:
    return None if shape is None else tuple(shape[1:])


def _no_cut_reason(module: nn.Module, is_last: bool) -> str | None:
    if _is_norm(module):
        return "normalisation layer: stays with the layer before it"
    if is_last:
        return "last layer: belongs to the head"
    return None


class _Tracer(fx.Tracer):
    """fx tracer that treats some custom modules as leaves and remembers where tracing failed."""

    def __init__(self, extra_leaves: set[str]) -> None:
        super().__init__()
        self.extra_leaves = extra_leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # subclasses of torch's own parametric layers (e.g. a faster Embedding) are still layers
        return (module_qualified_name in self.extra_leaves or isinstance(m, _LAYER_TYPES)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
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


class _FxProgram:
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
    def read(cls, model: nn.Module, inputs: tuple[Tensor, ...], expected: Tensor) -> _FxProgram:
        gm, opaque = _symbolic_trace(model)
        recorder = _Recorder(gm)
        try:
            with torch.no_grad():
                out = recorder.run(*inputs)
        except Exception as exc:
            reason = f"it fails on the example batch: {type(exc).__name__}: {exc}"
            raise _Untraceable("the traced graph", reason) from exc
        if not (isinstance(out, Tensor) and out.shape == expected.shape and torch.equal(out, expected)):
            reason = "it does not reproduce the model's output (state frozen at trace time)"
            raise _Untraceable("the traced graph", reason)
        return cls(gm, recorder.shapes, inputs, opaque)

    # -- layers and cuts ------------------------------------------------------------------------

    def layers(self) -> list[TracedLayer]:
        return list(self._layers)

    def _find_layers(self) -> list[TracedLayer]:
        calls = [n for n in self.order if n.op == "call_module" and _has_params(self._module(n))]
        cutters = [n for n in calls if not _is_norm(self._module(n))]
        following = dict(zip(cutters, cutters[1:]))
        result = []
        for n in calls:
            module = self._module(n)
            reason = _no_cut_reason(module, is_last=n not in following)
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
                return p, _strip_batch(self.shapes[live[0]]), None
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
        ins = tuple(_strip_batch(self.shapes[a]) for a in n.all_input_nodes if self.shapes.get(a) is not None)
        return LayerSignature(type(module).__name__, _hparams(module), ins, _strip_batch(self.shapes.get(n)))

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
                raise _Untraceable(what, f"{type(exc).__name__}: {_first_line(exc)}") from exc
            opaque.add(where)
            continue
        return fx.GraphModule(model, graph, class_name=type(model).__name__), sorted(opaque)
    raise _Untraceable(f"the forward of {type(model).__name__}", "tracing did not converge")


class _Chain(nn.Module):
    """Leaf modules applied one after another: the component type of the forward-hook fallback."""

    def __init__(self, layer_names: Sequence[str], steps: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layer_names = list(layer_names)
        self.steps = nn.ModuleList(steps)

    def forward(self, *args: Tensor) -> Tensor:
        x = self.steps[0](*args)
        for step in self.steps[1:]:
            x = step(x)
        return x


@dataclass
class _Call:
    name: str
    module: nn.Module
    in_shapes: tuple[Shape | None, ...]
    out_shape: Shape | None


class _ChainProgram:
    """A model whose leaf modules, verified on the example batch, run strictly as a chain."""

    method = "hooks"

    def __init__(self, calls: list[_Call], batch: int) -> None:
        self.calls = calls
        self.batch = batch
        self.opaque: list[str] = []  # every leaf is opaque here; the field is for the fx reader

    @classmethod
    def read(cls, model: nn.Module, inputs: tuple[Tensor, ...], expected: Tensor) -> _ChainProgram:
        records, out = _record_leaf_calls(model, inputs)
        _verify_chain(records, inputs, out)
        calls = [
            _Call(name, module, tuple(tuple(a.shape) if isinstance(a, Tensor) else None for a in args),
                  tuple(o.shape) if isinstance(o, Tensor) else None)
            for name, module, args, o in records
        ]
        program = cls(calls, inputs[0].shape[0])
        _, whole, _ = program.build([])
        with torch.no_grad():
            again = whole(*inputs)
        if not torch.equal(again, expected):
            raise _Untraceable("the leaf-module chain", "re-running the leaves in order does not reproduce the output")
        return program

    def layers(self) -> list[TracedLayer]:
        calls = [(i, c) for i, c in enumerate(self.calls) if _has_params(c.module)]
        cutters = [i for i, c in calls if not _is_norm(c.module)]
        following = dict(zip(cutters, cutters[1:]))
        result = []
        for i, call in calls:
            reason = _no_cut_reason(call.module, is_last=i not in following)
            position, shape = -1, None
            if reason is None:
                position = following[i] - 1
                out = self.calls[position].out_shape
                if out is not None and len(out) >= 1 and out[0] == self.batch:
                    shape = _strip_batch(out)
                else:
                    position, reason = -1, "the value handed on is not a batch tensor"
            ins = tuple(_strip_batch(s) for s in call.in_shapes if s is not None)
            sig = LayerSignature(type(call.module).__name__, _hparams(call.module), ins, _strip_batch(call.out_shape))
            result.append(TracedLayer(call.name, sig, shape, reason, position))
        return result

    def build(self, cuts: Sequence[int]) -> tuple[list[nn.Module], nn.Module, list[list[str]]]:
        bounds = [-1, *cuts, len(self.calls) - 1]
        pieces, modules = [], []
        for k in range(len(cuts) + 1):
            segment = self.calls[bounds[k] + 1:bounds[k + 1] + 1]
            names = [c.name for c in segment]
            steps = copy.deepcopy([c.module for c in segment])  # one deepcopy keeps ties inside a piece
            pieces.append(_Chain(names, steps).eval())
            modules.append(names)
        return pieces[:-1], pieces[-1], modules


_Record = tuple[str, nn.Module, tuple, Any]  # leaf name, leaf, positional args, output


def _record_leaf_calls(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[list[_Record], Any]:
    records: list[_Record] = []

    def hook(name: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if kwargs:
            raise _Untraceable(f"module {name!r}", "it is called with keyword arguments")
        records.append((name, module, args, out))

    handles = [
        m.register_forward_hook(lambda mod, a, kw, o, _n=name: hook(_n, mod, a, kw, o), with_kwargs=True)
        for name, m in model.named_modules()
        if next(m.children(), None) is None and m is not model
    ]
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return records, out


def _verify_chain(records: list[_Record], inputs: tuple[Tensor, ...], out: Any) -> None:
    """Each leaf must receive exactly the previous leaf's output object; the last's output is the model's."""
    if not records:
        raise _Untraceable("the model", "it calls no sub-modules")
    first_name, _, first_args, _ = records[0]
    if len(first_args) != len(inputs) or any(a is not x for a, x in zip(first_args, inputs)):
        raise _Untraceable(f"leaf {first_name!r}", "it does not receive the model inputs unchanged")
    seen = {id(records[0][1])}
    for (prev_name, _, _, prev_out), (name, module, args, _) in zip(records, records[1:]):
        if id(module) in seen:
            raise _Untraceable(f"leaf {name!r}", "it is called more than once")
        seen.add(id(module))
        if len(args) != 1 or args[0] is not prev_out:
            raise _Untraceable(f"leaf {name!r}", f"its input is not the output of {prev_name!r}")
    if records[-1][3] is not out:
        raise _Untraceable(f"leaf {records[-1][0]!r}", "its output is not the model's output")


# --------------------------------------------------------------------------------------------- #
# Alignment
# --------------------------------------------------------------------------------------------- #


def _lcs(a: Sequence[Any], b: Sequence[Any]) -> list[Any]:
    """Longest common subsequence (classic DP; sequences are a few dozen layers)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            out.append(a[i])
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


def _embed(common: Sequence[Any], layers: Sequence[TracedLayer]) -> list[TracedLayer]:
    """Leftmost occurrence of ``common`` in one model's layers (exists: it is a common subsequence)."""
    picked, j = [], 0
    for key in common:
        while layers[j].key != key:
            j += 1
        picked.append(layers[j])
        j += 1
    return picked


def _align_identical(traces: Sequence[ModelTrace]) -> tuple[list[list[TracedLayer]], list[Any]]:
    sequences = [trace.cut_valid() for trace in traces]
    common = [layer.key for layer in sequences[0]]
    for seq in sequences[1:]:
        common = _lcs(common, [layer.key for layer in seq])
    if not common:
        raise EMMError(_no_common_message(traces))
    return [_embed(common, seq) for seq in sequences], common


def _no_common_message(traces: Sequence[ModelTrace]) -> str:
    lines = [
        "the models share no identical layer to cut after (same type, hyper-parameters, shapes and "
        "cut shape), so Algorithm 1 finds no common level. Cut-valid layers per model:"
    ]
    for trace in traces:
        valid = trace.cut_valid()
        listing = "\n".join(f"      {layer.describe()}" for layer in valid) or "      (no valid cut point)"
        lines.append(f"  {trace.name} ({trace.model_type}):\n{listing}")
    lines.append(
        "Give the models at least one hidden layer of the same width (and the same embedding), "
        "or use align='project' to cut at equal relative depth with adapters."
    )
    return "\n".join(lines)


def _align_project(traces: Sequence[ModelTrace], levels: int | None) -> tuple[list[list[TracedLayer]], list[int]]:
    """Cut every model at equal relative depth among its cut points that hand on a 1-D tensor."""
    candidates = [[layer for layer in t.cut_valid() if len(layer.cut_shape or ()) == 1] for t in traces]
    available = min(len(c) for c in candidates)
    if available == 0:
        empty = ", ".join(t.name for t, c in zip(traces, candidates) if not c)
        raise EMMError(
            f"align='project' needs every model to have a cut point handing on a [B, width] tensor; "
            f"{empty} has none. Give it a hidden layer before its output layer"
        )
    count = levels or available
    if count > available:
        raise EMMError(
            f"levels={count} but model(s) {', '.join(t.name for t, c in zip(traces, candidates) if len(c) < count)} "
            f"have only {available} usable cut points; pass levels<={available}"
        )
    chosen = [[c[_depth_index(k, count, len(c))] for k in range(count)] for c in candidates]
    targets = [max(per_model[k].cut_shape[0] for per_model in chosen) for k in range(count)]  # type: ignore[index]
    return chosen, targets


def _depth_index(k: int, levels: int, available: int) -> int:
    """Index of level k's cut among ``available`` cut points: nearest to relative depth (k+1)/levels.

    Rounds half up, so indices strictly increase (available >= levels) and the last level is always
    the last cut point, right before the head.
    """
    return (2 * (k + 1) * available + levels) // (2 * levels) - 1


def _build_adapters(chosen: list[list[TracedLayer]], targets: list[int]) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Per model and level: Linear to the common width and back, initialised as pad / truncate."""
    into, back = nn.ModuleList(), nn.ModuleList()
    for per_model in chosen:
        widths = [layer.cut_shape[0] for layer in per_model]  # type: ignore[index]
        into.append(nn.ModuleList(_padding_linear(w, t) for w, t in zip(widths, targets)))
        back.append(nn.ModuleList(_padding_linear(t, w) for w, t in zip(widths, targets)))
    return into, back


def _padding_linear(n_in: int, n_out: int) -> nn.Linear:
    """A Linear that starts as the identity on the shared dimensions: zero-pad or truncate, exactly."""
    linear = nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(n_out, n_in))
        linear.bias.zero_()
    return linear


# --------------------------------------------------------------------------------------------- #
# Describing the plan
# --------------------------------------------------------------------------------------------- #


def _spans(
    trace: ModelTrace, cuts: list[TracedLayer], pieces: list[nn.Module], head: nn.Module, modules: list[list[str]]
) -> list[Span]:
    """Spans of model i: one per level, then the head."""
    in_shapes: tuple[Shape, ...] = trace.input_shapes
    spans = []
    for layer, piece, names in zip(cuts, pieces, modules):
        spans.append(Span(trace.name, tuple(names), layer.name, _count(piece), in_shapes, layer.cut_shape))
        in_shapes = (layer.cut_shape,)  # type: ignore[assignment]
    out = _strip_batch(tuple(trace.expected.shape))
    spans.append(Span(trace.name, tuple(modules[-1]), None, _count(head), in_shapes, out))
    return spans


def _levels(
    traces: Sequence[ModelTrace],
    chosen: list[list[TracedLayer]],
    common: list[Any] | None,
    targets: list[int] | None,
    spans: list[list[Span]],
) -> list[Level]:
    result = []
    in_shapes: tuple[Shape, ...] = traces[0].input_shapes
    for k in range(len(chosen[0])):
        signature = common[k][0] if common is not None else None
        out = (targets[k],) if targets is not None else chosen[0][k].cut_shape
        result.append(Level(
            index=k,
            signature=signature,
            in_shapes=in_shapes,
            out_shape=out,  # type: ignore[arg-type]
            spans=tuple(per_model[k] for per_model in spans),
            target_width=None if targets is None else targets[k],
        ))
        in_shapes = (out,)  # type: ignore[assignment]
    return result


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dedupe(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _fmt_shape(shape: Shape | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _describe_inputs(inputs: tuple[Tensor, ...]) -> str:
    return ", ".join(f"{str(x.dtype).removeprefix('torch.')}{_fmt_shape(tuple(x.shape))}" for x in inputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
