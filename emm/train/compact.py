"""A compact serving model: one small multi-task network that reproduces the fused model's scores.

What it is: EMM's Shared-Bottom (``emm.models.baselines.shared_bottom``: one embedding, one MLP shared by
every task, a small tower per task), its widths chosen by a budget of FLOPs per row (``spec_for_budget``)
and trained on the fused model's probabilities (``train_compact``). Its architecture is a small JSON spec
(``CompactSpec``) beside a safetensors file, rebuilt by ``build_from_config`` (the registered pyfunc's
builder), so it loads without pickle like every EMM model.

Why the widths come from a FLOPs budget, measured: speed is what the compact model is for, and the FLOPs
per row counted by torch on real rows (``emm.train.cost.model_cost``) measure its work without depending on
the machine. The bottom's first layer is the widest that fits the budget; each next layer is half as wide
as the one before, so one number sets the shape and the cost grows with it (a bisection finds it). Widths
are multiples of ``WIDTH_STEP``: the CPU's vector units and the GEMM kernels work in such blocks, so an odd
width costs a block's time anyway.

Why it trains on the fused model's probability on *every* training row, labelled or not, and not on a mix
with the labels (``emm.train.distill``'s rule, where a missing label stays missing): compression's goal is
the fused model's scores at a fraction of its cost, not a better model. The teacher's probability says
more per row than a 0/1 label (how sure it is), and it exists on rows whose label is missing, where a
scarce task would otherwise teach the student nothing. ``distill``'s concern, that the teacher's errors
become targets, is the point here: the compact model is to reproduce the teacher, errors included, and it
is judged against the labels, paired with the fused model on the same test rows, before anyone serves it
(``emm.pipeline.compress``). Early stopping still scores the validation labels, so no teacher can make
the student look better than it is. The teacher is scored once over the training rows (``soft_targets``),
not per batch as ``distill`` does: it is the expensive model and its scores do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from emm.data.schema import Schema
from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.models.baselines.shared_bottom import SharedBottom, build_shared_bottom
from emm.models.embedding import NumericOptions
from emm.options import Options
from emm.tracker import Tracker
from emm.train.cost import ModelCost, model_cost
from emm.train.options import TrainConfig
from emm.train.predict import predict_proba
from emm.train.trainer import FitResult, Trainer

log = logging.getLogger(__name__)
WIDTH_STEP = 8        # every bottom width is a multiple of this (see the module docstring)
COST_ROWS = 256       # real rows the FLOPs of a candidate are counted on
SPEC_FORMAT = "emm.compact/1"
TINY_WEIGHT = 1e-20   # weights below this are set to 0 after training (``flush_tiny_weights``)


class CompactOptions(Options):
    """How the compact model is sized and trained (params.yaml's ``compress`` section adds the gate)."""

    flops_per_row: int = Field(default=270_000, gt=0, description="budget: the widest bottom whose measured "
                               "FLOPs per row (emm.train.cost) fit it")
    layers: int = Field(default=2, ge=1, le=6, description="bottom layers, each half as wide as the one before")
    max_width: int = Field(default=4096, ge=WIDTH_STEP, description="widest first bottom layer considered")
    tower: list[int] = Field(default_factory=lambda: [8], description="hidden widths of each task's tower")
    embed_dim: int = Field(default=8, gt=0, description="embedding width per sparse feature")
    numeric: NumericOptions = Field(
        default_factory=lambda: NumericOptions(mode="periodic"),
        description="the dense features' encoding (emm.models.embedding): periodic, as the built-in pool models, "
                    "by default; minmax is cheaper to run and resolves heavy-tailed columns worse")
    warm_start: str = Field(default="auto", description="auto: start the embedding and the first bottom layer from "
                            "the pool member of the hardest task (lowest fused val AUC) that has the same "
                            "embedding (``warm_start``); a member's name: that one; none: random weights")
    train: TrainConfig = TrainConfig()


class CompactSpec(Options):
    """The compact architecture as recorded beside its weights (compact.json, the pyfunc's model.json)."""

    format: Literal["emm.compact/1"] = SPEC_FORMAT
    bottom: list[int]
    tower: list[int]
    embed_dim: int
    numeric: NumericOptions


def bottom_widths(first: int, layers: int) -> list[int]:
    """``[first, first / 2, ...]``, ``layers`` of them, each a multiple of ``WIDTH_STEP`` and at least that."""
    return [max(WIDTH_STEP, (first >> i) // WIDTH_STEP * WIDTH_STEP) for i in range(layers)]


def build_compact(spec: CompactSpec, schema: Schema) -> SharedBottom:
    """A fresh compact model (weights not trained) for ``schema``."""
    return build_shared_bottom(schema, list(spec.bottom), list(spec.tower), spec.embed_dim,
                               spec.numeric.model_dump(mode="json"))


def build_from_config(config: dict[str, Any], schema: Schema) -> SharedBottom:
    """The pyfunc builder: compact.json's ``spec`` -> a fresh compact model."""
    return build_compact(CompactSpec.model_validate(config), schema)


def spec_for_budget(schema: Schema, opts: CompactOptions, rows: SplitTensors) -> tuple[CompactSpec, ModelCost]:
    """The widest compact model whose FLOPs per row, counted on ``rows``, fit ``opts.flops_per_row``.

    An ``EMMError`` when even the narrowest (every bottom layer ``WIDTH_STEP`` wide) does not fit: it names
    that model's cost, the smallest budget that works."""
    sample = rows.head(COST_ROWS)

    def candidate(steps: int) -> tuple[CompactSpec, ModelCost]:
        spec = CompactSpec(bottom=bottom_widths(steps * WIDTH_STEP, opts.layers), tower=list(opts.tower),
                           embed_dim=opts.embed_dim, numeric=opts.numeric)
        return spec, model_cost(build_compact(spec, schema), sample.sparse, sample.dense)

    def fits(found: tuple[CompactSpec, ModelCost]) -> bool:
        return found[1].flops_per_row <= opts.flops_per_row

    low = candidate(1)
    if not fits(low):
        raise EMMError(f"compress.flops_per_row {opts.flops_per_row:,} is below the cost of the smallest compact model "
                       f"(bottom {low[0].bottom}, tower {low[0].tower}, embed_dim {low[0].embed_dim}: "
                       f"{low[1].flops_per_row:,} FLOPs per row): raise it to at least that, or make the tower or "
                       "embedding smaller")
    lo, hi = 1, opts.max_width // WIDTH_STEP
    best = low
    top = candidate(hi)
    if fits(top):
        return top
    while hi - lo > 1:  # invariant: candidate(lo) fits, candidate(hi) does not; cost grows with the width
        mid = (lo + hi) // 2
        found = candidate(mid)
        if fits(found):
            lo, best = mid, found
        else:
            hi = mid
    return best


@torch.no_grad()
def soft_targets(teacher: nn.Module, data: SplitTensors, batch_size: int = 65536) -> SplitTensors:
    """``data`` with its labels replaced by the teacher's probabilities on every row (labelled or not)."""
    probs = torch.from_numpy(predict_proba(teacher, data, batch_size))
    if probs.shape != data.labels.shape:
        raise EMMError(f"the teacher returns {list(probs.shape)} scores for labels of shape {list(data.labels.shape)}: "
                       "it must score the data's tasks, in their order")
    if not torch.isfinite(probs).all():
        raise EMMError("the teacher (the fused model) gives non-finite scores on some training rows; refit it "
                       "(`emm fuse`) before compressing it")
    return SplitTensors(data.sparse, data.dense, probs.to(data.labels.dtype), data.task_names)


@torch.no_grad()
def flush_tiny_weights(model: nn.Module, below: float = TINY_WEIGHT) -> int:
    """Set every weight (and float buffer) smaller in magnitude than ``below`` to 0; returns how many.

    Why: weight decay drives the weights of units that stopped learning toward zero without ever reaching it,
    and multiplied by an activation such a weight gives a denormal number, which x86 CPUs compute with many
    times slower than with any other, in torch and onnxruntime alike: a few thousand of them slow every row
    through the layer. Why this bound changes no score: the product of such a weight with any activation lies
    far below the float32 resolution of the sum it joins (a layer's output of order one), so the sums, and the
    scores, come out the same."""
    flushed = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            small = (tensor != 0) & (tensor.abs() < below)
            flushed += int(small.sum())
            tensor[small] = 0
    return flushed


def first_linear(module: nn.Module, in_features: int, max_out: int) -> nn.Linear | None:
    """The first ``nn.Linear`` of ``module`` (registration order) that reads ``in_features`` values and has at most
    ``max_out`` units: in a pool member with the compact model's embedding, its first layer over the embedded row."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear) and sub.in_features == in_features and sub.out_features <= max_out:
            return sub
    return None


def shared_embedding(model: SharedBottom, member: nn.Module) -> list[str]:
    """The names of ``model``'s embedding tensors when ``member`` has every one of them under the same name and
    shape (it encodes rows as the compact model does), else []. The embedding does not depend on the bottom's
    widths, so any compact model of the same ``embed_dim`` and ``numeric`` answers for all of them."""
    ours, theirs = model.state_dict(), member.state_dict()
    embedding = [k for k in ours if k.startswith("embedding.")]
    if not embedding or any(k not in theirs or theirs[k].shape != ours[k].shape for k in embedding):
        return []
    return embedding


@torch.no_grad()
def warm_start(model: SharedBottom, member: nn.Module) -> list[str]:
    """Start ``model`` from what a trained pool member already learned; returns the compact tensors copied.

    Copied: every tensor of the compact model's embedding that the member has under the same name and shape
    (a built-in member encodes rows exactly as the compact model does), and, when the member has a first layer
    over that embedded row (``first_linear``), its units into the first rows of the bottom's first layer (the
    rest keep their random start). Nothing is copied unless the whole embedding matches: a first layer is only
    meaningful over the embedding it was trained on.

    Why: from random weights the compact model spends most of its epochs relearning an input representation the
    pool already holds; started from the member's, it reaches the fused model's scores in far fewer epochs. The
    member is only a starting point: every weight is trained on the fused model's probabilities afterwards."""
    embedding = shared_embedding(model, member)
    if not embedding:
        return []
    ours, theirs = model.state_dict(), member.state_dict()
    updates = {k: theirs[k].clone() for k in embedding}
    name, first = next((n, m) for n, m in model.bottom.named_modules() if isinstance(m, nn.Linear))
    layer = first_linear(member, first.in_features, first.out_features)
    if layer is not None and layer.bias is not None:
        weight, bias = first.weight.detach().clone(), first.bias.detach().clone()
        weight[:layer.out_features], bias[:layer.out_features] = layer.weight, layer.bias
        updates.update({f"bottom.{name}.weight": weight, f"bottom.{name}.bias": bias})
    model.load_state_dict({**ours, **updates})
    return sorted(updates)


@dataclass
class CompactResult:
    model: SharedBottom
    spec: CompactSpec
    cost: ModelCost
    fit: FitResult
    warm_started: list[str]


def train_compact(teacher: nn.Module, schema: Schema, train: SplitTensors, val: SplitTensors, opts: CompactOptions,
                  *, start_from: nn.Module | None = None, tracker: Tracker | None = None, progress: bool = False,
                  on_spec: Callable[[CompactSpec, ModelCost], None] | None = None) -> CompactResult:
    """Size the compact model by the budget, then train it on the teacher's probabilities over ``train``,
    early-stopping on the labels of ``val`` (the best epoch's weights are kept). ``on_spec`` hears the
    chosen architecture before training starts (to report it). ``start_from``: a trained pool member to
    ``warm_start`` from."""
    spec, cost = spec_for_budget(schema, opts, val)
    if on_spec is not None:
        on_spec(spec, cost)
    soft = soft_targets(teacher, train, opts.train.eval_batch_size)
    torch.manual_seed(opts.train.seed)  # the initial weights: the same run gives the same model
    model = build_compact(spec, schema)
    copied = warm_start(model, start_from) if start_from is not None else []
    fit = Trainer(model, opts.train, fingerprint=schema.fingerprint(),
                  made_from={"compact": spec.model_dump(mode="json")}, tracker=tracker, progress=progress,
                  desc="compact").fit(soft, val)
    flushed = flush_tiny_weights(model)
    if flushed:
        log.info("compact model: %d weights below %g set to 0 (they only slow scoring down)", flushed, TINY_WEIGHT)
    return CompactResult(model.eval(), spec, cost, fit, copied)
