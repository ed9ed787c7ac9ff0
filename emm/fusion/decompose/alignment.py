"""Which layers the models are cut after: the paper's identical layers, or equal relative depth.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from emm.errors import EMMError
from emm.fusion.decompose.records import ModelTrace, TracedLayer


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


def align_identical(traces: Sequence[ModelTrace]) -> tuple[list[list[TracedLayer]], list[Any]]:
    """Per model the layers to cut after, and the common (signature, cut shape) keys, in order."""
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


def align_project(traces: Sequence[ModelTrace], levels: int | None) -> tuple[list[list[TracedLayer]], list[int]]:
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


def build_adapters(chosen: list[list[TracedLayer]], targets: list[int]) -> tuple[nn.ModuleList, nn.ModuleList]:
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
