"""The plain records of a decomposition: what a traced layer is, what a level and a plan hold.

They live apart from the code that produces them so that consumers (``emm.fusion.store``, the fused
model, reports) can depend on the data shapes without pulling in the tracing machinery, and so that
``Plan.to_dict`` -- the JSON that ``emm.fusion.store`` re-derives and compares -- has one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

Shape = tuple[int, ...]
ALIGN_MODES = ("identical", "project")
PLAN_FORMAT = "emm.plan/1"


def fmt_shape(shape: Shape | None) -> str:
    """``[4, 8]`` for a known shape, ``?`` for an unknown one (error messages and reports)."""
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def strip_batch(shape: Shape | None) -> Shape | None:
    """Drop the batch dimension: signatures compare per-row shapes, so any batch size matches."""
    return None if shape is None else tuple(shape[1:])


class Program(Protocol):
    """What a model reader (torch.fx or forward hooks) hands on: signed layers, and a way to cut.

    ``build(cuts)`` takes the reader's own cut positions (``TracedLayer.position``) and returns the
    components, the head, and per piece the qualified names of the leaf modules it calls.
    """

    method: str
    opaque: list[str]

    def layers(self) -> list[TracedLayer]: ...

    def build(self, cuts: Sequence[int]) -> tuple[list[nn.Module], nn.Module, list[list[str]]]: ...


@dataclass(frozen=True)
class LayerSignature:
    """What makes two layers "the same layer" for Algorithm 1 (shapes exclude the batch dim)."""

    type: str
    hparams: str
    in_shapes: tuple[Shape, ...]
    out_shape: Shape | None

    def describe(self) -> str:
        ins = ", ".join(fmt_shape(s) for s in self.in_shapes)
        return f"{self.type}({self.hparams}) {ins}->{fmt_shape(self.out_shape)}"

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
        cut = f" => {fmt_shape(self.cut_shape)}" if self.cut_shape is not None else ""
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
    graph: Program

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
    # pool members that are not cut but join the fused model at the output (tree models): name, task, format,
    # file digest; recorded in plan.json for the fuse stage and the reader, never part of the cut itself
    output_members: list[dict[str, Any]] = field(default_factory=list)

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
            "output_members": list(self.output_members),
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
                    fmt_shape(level.out_shape) if first else "",
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
        if self.output_members:
            lines.append("at the output, not cut: " + ", ".join(
                f"{m['name']} ({m['task']}, {m['format']})" for m in self.output_members))
        return "\n".join(lines)
