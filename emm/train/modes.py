"""``eval_mode``: run a block with a module in eval mode and give it back in the mode it had.

Why a context manager: scoring, probing and tracing all need eval mode (no dropout, BatchNorm running
statistics untouched) without changing what the caller set; forgetting to restore is a silent bug.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block, then each sub-module's own flag back (mixed modes survive, e.g. a
    fused model whose frozen components stay in eval while the rest trains)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
