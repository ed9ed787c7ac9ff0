"""torch.fx tracing that is safe while other threads run models.

Why: ``fx.Tracer.trace`` patches ``nn.Module.__call__`` and ``nn.Module.__getattr__`` for the whole
process while it traces. Prefect runs pool members as threads of one process, so an outside model being
traced at import (``emm.models.portable``) sent every module call of a member training next to it into
the tracer, which failed with "module is not installed as a submodule". Two traces at once are worse:
each restores what it found when it started, so the later one can leave the earlier one's patch in
place for good.

``ThreadSafeTracing`` (a mixin placed before the ``fx.Tracer`` class) fixes both: traces take one
process-wide lock, and a module call or attribute read that reaches the tracer from any thread but the
tracing one runs untouched, as if no trace were going on.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor, nn

_TRACE_LOCK = threading.RLock()  # re-entrant: a tracer may trace again from inside its own trace


class ThreadSafeTracing:
    """Mixin for an ``fx.Tracer`` subclass: one trace per process at a time; other threads pass through."""

    _tracing_thread: int | None = None

    def trace(self, root: Any, *args: Any, **kwargs: Any) -> Any:
        with _TRACE_LOCK:
            outer, self._tracing_thread = self._tracing_thread, threading.get_ident()
            try:
                return super().trace(root, *args, **kwargs)  # type: ignore[misc]
            finally:
                self._tracing_thread = outer

    def on_tracing_thread(self) -> bool:
        """False for a call that reached the tracer's process-wide patches from another thread."""
        return threading.get_ident() == self._tracing_thread

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.on_tracing_thread():
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)  # type: ignore[misc]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if not self.on_tracing_thread():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)  # type: ignore[misc]


REPRODUCE_RTOL, REPRODUCE_ATOL = 1e-5, 1e-6


def reproduces(got: Any, want: Tensor) -> bool:
    """Whether a traced graph's output ``got`` is the model's own ``want``: same shape, values equal to float32
    rounding.

    Why not bit-equality: the graph runs the same operations, but a multithreaded kernel may sum in another order
    from one call to the next, so a correct trace can differ from the model in the last bits (CI once refused a
    DCN pool member that way). What the check is for, a Python branch frozen at trace time, changes values by far
    more than rounding."""
    return (isinstance(got, Tensor) and got.shape == want.shape
            and bool(torch.allclose(got, want, rtol=REPRODUCE_RTOL, atol=REPRODUCE_ATOL)))
