"""One module <-> one safetensors file: the only way EMM writes and reads weights.

Why one place: every artifact (pool models, plan components, the fused model, the MLflow bundle) must
load without pickle, refuse a file from another architecture with the key and shape named, refuse NaN/inf
weights (a model holding them only produces NaN, which surfaced later as a tracing failure or a metrics
traceback), and survive tied tensors (safetensors refuses shared memory; ties are stored once and recorded
as aliases).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from emm.errors import EMMError

_ALIASES_KEY = "emm_aliases"


def save_state(state: dict[str, Tensor], path: Path) -> None:
    """Write a state dict to ``path``; tied tensors are stored once and recorded as aliases."""
    tensors, aliases = _dedupe_state(state)
    save_file(tensors, str(path), metadata={_ALIASES_KEY: json.dumps(aliases)})


def save_module(module: nn.Module, path: Path) -> None:
    save_state(module.state_dict(), path)


def load_module(module: nn.Module, path: Path, *, what: str = "component", fix: str = "save the plan again") -> None:
    """Load ``path`` into ``module`` strictly: every key present, none extra, every shape equal, every
    value finite (``check_finite``).

    ``what`` names the module in messages, ``fix`` says what the user should do about a bad file.
    """
    path = Path(path)
    if not path.is_file():
        raise EMMError(f"weights file {path} is missing; the folder is incomplete: {fix}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except Exception as exc:
        raise EMMError(f"cannot read weights file {path} ({type(exc).__name__}: {exc}); {fix}") from exc
    for alias, canonical in aliases.items():
        if canonical not in tensors:
            raise EMMError(
                f"weights file {path}: alias {alias!r} points to missing key {canonical!r}; {fix}"
            )
        tensors[alias] = tensors[canonical]
    expected = module.state_dict()
    other = f"it was saved from another architecture: {fix}"
    for key in expected:
        if key not in tensors:
            raise EMMError(f"weights file {path} lacks key {key!r} that the {what} needs; {other}")
    for key in tensors:
        if key not in expected:
            raise EMMError(f"weights file {path} has key {key!r} that the {what} does not have; {other}")
    for key, tensor in expected.items():
        if tuple(tensors[key].shape) != tuple(tensor.shape):
            raise EMMError(
                f"weights file {path}: key {key!r} has shape {list(tensors[key].shape)}, the {what} expects "
                f"{list(tensor.shape)}; {other}"
            )
    check_finite(tensors, {name for name, _ in module.named_parameters()}, path, what=what, fix=fix)
    module.load_state_dict(tensors, strict=True)


def check_finite(tensors: dict[str, Tensor], parameters: set[str], path: Path, *, what: str, fix: str) -> None:
    """Refuse NaN anywhere and inf in a parameter, naming the key, the count and the module.

    Why inf is allowed in a buffer: a mask buffer may hold -inf by design (an outside model's attention
    mask); a broken one still shows where the model is scored (``emm.train.metrics``).
    """
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        bad = int(torch.isnan(tensor).sum()) + (int(torch.isinf(tensor).sum()) if key in parameters else 0)
        if bad:
            raise EMMError(f"weights file {path}: {key!r} holds {bad} NaN/inf value(s) of {tensor.numel()}; the "
                           f"{what} would only produce NaN scores (did its training diverge?): {fix}")


def _dedupe_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Contiguous, unshared tensors for safetensors (which refuses shared memory), plus alias map.

    Keys naming the very same view (tied weights) become aliases of the first key; other tensors that
    merely share storage with an earlier one, or are views into a larger storage, are copied.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        tensor = tensor.detach()
        if tensor.numel() == 0:
            tensors[key] = tensor.clone().contiguous().cpu()
            continue
        ptr = tensor.untyped_storage().data_ptr()
        view = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in views:
            aliases[key] = views[view]
            continue
        views[view] = key
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        if ptr in storages or not whole or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        storages.add(ptr)
        tensors[key] = tensor.cpu()
    return tensors, aliases
