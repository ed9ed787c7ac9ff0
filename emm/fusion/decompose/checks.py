"""Checks on what the caller passes to decompose, and the exactness check on what it returns.

Every problem a user can cause (wrong batch layout, a model that fails or returns no batch tensor,
bad ``align``/``levels``, duplicate names) is raised here as an ``EMMError`` that names the model and
says what to pass instead, before any tracing starts.

Exactness
    Components are deep copies (they share parameters with nothing, so they can be frozen one by
    one), built from the model in eval mode and returned in eval mode. Running a model's components
    one after another, then its head, reproduces the model's output bit for bit (``torch.equal``);
    ``check_exact`` verifies this on the example batch for every model before a plan is returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from emm.errors import EMMError
from emm.fusion.decompose.records import ALIGN_MODES, ModelTrace, fmt_shape


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
        shapes = ", ".join(fmt_shape(tuple(x.shape)) for x in example_input)
        raise EMMError(
            f"example_input tensors must share a non-zero batch dimension, got shapes {shapes}; "
            "pass one batch (same rows for every tensor) from the training data"
        )
    return tuple(example_input)


def check_names(models: Sequence[nn.Module], names: Sequence[str] | None) -> list[str]:
    """One unique name per model (default ``model{i}``): names key every report, error and file."""
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


def check_align(align: str, levels: int | None) -> None:
    """Reject ``levels`` where it would be silently ignored (identical alignment fixes L itself)."""
    if align not in ALIGN_MODES:
        raise EMMError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")
    if levels is not None and align != "project":
        raise EMMError("levels= only applies to align='project'; with align='identical' the common layers fix it")
    if levels is not None and levels < 1:
        raise EMMError(f"levels must be at least 1, got {levels}")


def run_example(model: nn.Module, inputs: tuple[Tensor, ...], name: str) -> Tensor:
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
        got = fmt_shape(tuple(out.shape)) if isinstance(out, Tensor) else type(out).__name__
        raise EMMError(
            f"model {name!r} ({type(model).__name__}) returned {got} for a batch of {batch} rows; decompose needs "
            "single-task models returning one tensor with the batch first (logits [B, 1])"
        )
    return out


def check_exact(trace: ModelTrace, pieces: list[nn.Module], head: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Components then head must give the model's own output bit for bit, or no plan is returned."""
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


def _describe_inputs(inputs: tuple[Tensor, ...]) -> str:
    """``int64[7, 3], float32[7, 2]``: enough to see a wrong layout at a glance."""
    return ", ".join(f"{str(x.dtype).removeprefix('torch.')}{fmt_shape(tuple(x.shape))}" for x in inputs)
