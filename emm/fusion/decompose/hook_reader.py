"""Reading a model through forward hooks: the fallback when its own forward cannot be fx-traced.

If torch.fx fails on the model's forward, we record the calls of its leaf modules on the example
batch. That is only a faithful description when the leaves run strictly as a chain (each leaf
receives exactly the previous leaf's output object and the last one's output *is* the model output,
e.g. ``nn.Sequential``), so that is verified, and the rebuilt chain must reproduce the output. Hooks
cannot see Python branches: a chain verified on the example batch is trusted for other batches too.

Components built here are ``Chain`` modules. The type is public because consumers that inspect a
component's structure (``emm.fusion.akf`` asks whether a component ends in a ReLU) need to recognise
it by type rather than by guessing from its attributes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from emm.fusion.decompose.layers import Untraceable, has_params, hparams, is_norm, no_cut_reason
from emm.fusion.decompose.records import LayerSignature, Shape, TracedLayer, strip_batch


class Chain(nn.Module):
    """Leaf modules applied one after another: the component type of the forward-hook fallback.

    ``steps`` are the leaves in call order (the first takes the component's inputs, every other one
    the previous output); ``layer_names`` are their qualified names in the model they were cut from.
    """

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
    """One recorded leaf call, reduced to what signing and cutting need (no example tensors kept)."""

    name: str
    module: nn.Module
    in_shapes: tuple[Shape | None, ...]
    out_shape: Shape | None


class ChainProgram:
    """A model whose leaf modules, verified on the example batch, run strictly as a chain."""

    method = "hooks"

    def __init__(self, calls: list[_Call], batch: int) -> None:
        self.calls = calls
        self.batch = batch
        self.opaque: list[str] = []  # every leaf is opaque here; the field is for the fx reader

    @classmethod
    def read(cls, model: nn.Module, inputs: tuple[Tensor, ...], expected: Tensor) -> ChainProgram:
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
            raise Untraceable("the leaf-module chain", "re-running the leaves in order does not reproduce the output")
        return program

    def layers(self) -> list[TracedLayer]:
        """Signed layers; a cut goes right before the next cut-able layer, the latest point in its block.

        In a verified chain only the previous leaf's output is live between leaves, so any such point
        is a valid cut as long as that output is a batch tensor.
        """
        calls = [(i, c) for i, c in enumerate(self.calls) if has_params(c.module)]
        cutters = [i for i, c in calls if not is_norm(c.module)]
        following = dict(zip(cutters, cutters[1:]))
        result = []
        for i, call in calls:
            reason = no_cut_reason(call.module, is_last=i not in following)
            position, shape = -1, None
            if reason is None:
                position = following[i] - 1
                out = self.calls[position].out_shape
                if out is not None and len(out) >= 1 and out[0] == self.batch:
                    shape = strip_batch(out)
                else:
                    position, reason = -1, "the value handed on is not a batch tensor"
            ins = tuple(strip_batch(s) for s in call.in_shapes if s is not None)
            sig = LayerSignature(type(call.module).__name__, hparams(call.module), ins, strip_batch(call.out_shape))
            result.append(TracedLayer(call.name, sig, shape, reason, position))
        return result

    def build(self, cuts: Sequence[int]) -> tuple[list[nn.Module], nn.Module, list[list[str]]]:
        """Split the chain after each cut position into ``Chain`` pieces; the last piece is the head."""
        bounds = [-1, *cuts, len(self.calls) - 1]
        pieces, modules = [], []
        for k in range(len(cuts) + 1):
            segment = self.calls[bounds[k] + 1:bounds[k + 1] + 1]
            names = [c.name for c in segment]
            steps = copy.deepcopy([c.module for c in segment])  # one deepcopy keeps ties inside a piece
            pieces.append(Chain(names, steps).eval())
            modules.append(names)
        return pieces[:-1], pieces[-1], modules


_Record = tuple[str, nn.Module, tuple, Any]  # leaf name, leaf, positional args, output


def _record_leaf_calls(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[list[_Record], Any]:
    """Run the model once with a hook on every leaf; the argument and output *objects* are kept so
    that ``_verify_chain`` can check identity, not just equal values."""
    records: list[_Record] = []

    def hook(name: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if kwargs:
            raise Untraceable(f"module {name!r}", "it is called with keyword arguments")
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
        raise Untraceable("the model", "it calls no sub-modules")
    first_name, _, first_args, _ = records[0]
    if len(first_args) != len(inputs) or any(a is not x for a, x in zip(first_args, inputs)):
        raise Untraceable(f"leaf {first_name!r}", "it does not receive the model inputs unchanged")
    seen = {id(records[0][1])}
    for (prev_name, _, _, prev_out), (name, module, args, _) in zip(records, records[1:]):
        if id(module) in seen:
            raise Untraceable(f"leaf {name!r}", "it is called more than once")
        seen.add(id(module))
        if len(args) != 1 or args[0] is not prev_out:
            raise Untraceable(f"leaf {name!r}", f"its input is not the output of {prev_name!r}")
    if records[-1][3] is not out:
        raise Untraceable(f"leaf {records[-1][0]!r}", "its output is not the model's output")
