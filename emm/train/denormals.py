"""Training on a CPU with denormal floats flushed to zero, for the length of one fit.

Why: weights that weight decay and Adam shrink toward zero pass through the denormal range (below ~1e-38 in
float32), where x86 CPUs compute many times slower; an epoch of the same model and rows then takes longer and
longer as training goes on. Flushing them changes no result that matters (they are 1e-38 and smaller) and keeps
every epoch as fast as the first. The setting is process-wide, so it is restored when the fit ends: a caller's
own tensors and other code (an ``emm predict``, a test) keep IEEE behaviour outside training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def flushing() -> bool:
    """Whether this process flushes denormals now (a product that should be one comes out as 0)."""
    return (torch.tensor([1e-30], dtype=torch.float32) * 1e-10).item() == 0.0


@contextmanager
def flush_denormals() -> Iterator[bool]:
    """Flush denormals inside the block where the CPU supports it (yields whether it does), then restore."""
    before = flushing()
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported and not before:
            torch.set_flush_denormal(False)
