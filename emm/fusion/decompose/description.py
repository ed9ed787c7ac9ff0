"""Describing a cut: per model its spans (which modules each piece runs), per level its shapes.

Kept apart from the cutting itself: these records are what ``Plan.to_dict`` and ``Plan.report``
show and what ``emm.fusion.store`` compares when it re-derives a saved plan, so whatever changes here
changes the saved format, and nothing else does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from emm.fusion.decompose.records import Level, ModelTrace, Shape, Span, TracedLayer, strip_batch


def model_spans(
    trace: ModelTrace, cuts: list[TracedLayer], pieces: list[nn.Module], head: nn.Module, modules: list[list[str]]
) -> list[Span]:
    """Spans of model i: one per level, then the head."""
    in_shapes: tuple[Shape, ...] = trace.input_shapes
    spans = []
    for layer, piece, names in zip(cuts, pieces, modules):
        spans.append(Span(trace.name, tuple(names), layer.name, _count(piece), in_shapes, layer.cut_shape))
        in_shapes = (layer.cut_shape,)  # type: ignore[assignment]
    out = strip_batch(tuple(trace.expected.shape))
    spans.append(Span(trace.name, tuple(modules[-1]), None, _count(head), in_shapes, out))
    return spans


def plan_levels(
    traces: Sequence[ModelTrace],
    chosen: list[list[TracedLayer]],
    common: list[Any] | None,
    targets: list[int] | None,
    spans: list[list[Span]],
) -> list[Level]:
    """Per level: the common signature (None when projected), shapes in and out, every model's span."""
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
    """Parameter count of one piece (shared tensors inside a piece counted once, as torch does)."""
    return sum(p.numel() for p in module.parameters())
