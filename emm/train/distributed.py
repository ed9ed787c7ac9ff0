"""Data-parallel training across processes: DistributedDataParallel under ``torchrun``.

When is it on: exactly when the process was launched by ``torchrun`` (or anything that sets the same
environment) with ``WORLD_SIZE > 1``. Launching N processes is the request; a plain ``emm pretrain``
never initialises anything and runs the single-process code path unchanged.

What each rank does, and why:
- one process group per run (``session``): NCCL when CUDA is present (one GPU per local rank), gloo on
  CPU; ``params.yaml`` ``scale.backend`` can force one. Barrier and destroy at the end.
- each rank reads *its shard* of every split (``emm.data.stream``: contiguous row ranges, only the
  overlapping row groups are read) and the model is wrapped in DDP, so gradients are averaged;
  ``train.batch_size`` stays the *global* batch (each rank takes ``ceil(batch_size / W)`` rows a step),
  which keeps the number of steps, the learning rate and so the results those of one process.
- evaluation: each rank scores its shard, the predictions are gathered, rank 0 computes the metrics and
  broadcasts them. Early stopping therefore takes identical decisions on every rank by construction.
- only rank 0 writes: checkpoints, pool/, fused/, MLflow. A resume reads the checkpoint on rank 0 and
  broadcasts it, so no shared filesystem is needed for that.

Everything here is a no-op in a single process, so callers never branch on "are we distributed".
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from emm.data.options import ScaleConfig
from emm.errors import EMMError
from emm.train.modes import eval_mode

log = logging.getLogger(__name__)
T = TypeVar("T")
MAIN = 0


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the run. The default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """True inside an initialised process group of more than one rank."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == MAIN

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world) as the data readers take it."""
        return (self.rank, self.world_size) if self.active else (0, 1)

    def local_batch(self, global_batch: int) -> int:
        """Rows per rank and step, so that the global batch is ``global_batch`` (rounded up)."""
        return math.ceil(global_batch / self.world_size) if self.active else global_batch


_SINGLE = DistContext()
_current: DistContext = _SINGLE


def current() -> DistContext:
    """The active context (set by ``session``), or the single-process one."""
    return _current if _current.active else _SINGLE


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it; 1 when not launched by torchrun."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise EMMError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from exc


def resolve_backend(preference: str) -> str:
    if preference == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if preference == "nccl" and not torch.cuda.is_available():
        raise EMMError("scale.backend is nccl but CUDA is not available on this machine; use gloo (or auto)")
    return preference


@contextlib.contextmanager
def session(cfg: ScaleConfig | None = None) -> Iterator[DistContext]:
    """Join the torchrun process group for the duration of a stage (no-op in a single process).

    On success every rank waits at a barrier before the group is destroyed, so rank 0's writes are
    complete when any rank's command returns. On an error the group is torn down without a barrier
    (the other ranks are stopped by torchrun when this one exits non-zero).
    """
    global _current
    world = launched_world_size()
    if world <= 1 or dist.is_initialized():
        yield current()
        return
    cfg = cfg or ScaleConfig()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = resolve_backend(cfg.backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=cfg.timeout_s))
    _current = DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)
    log.info("rank %d/%d: process group up (%s, %s)", rank, world, backend, device)
    ok = False
    try:
        yield _current
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()
        _current = _SINGLE


# ---- collectives (all no-ops in a single process) -----------------------------------------------------------
def broadcast_object(obj: T, ctx: DistContext | None = None) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for small things: metrics, decisions, a checkpoint)."""
    ctx = ctx or current()
    if not ctx.active:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=MAIN, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]  # type: ignore[return-value]


def on_main(fn: Callable[[], T], ctx: DistContext | None = None) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its user error) to every rank.

    Why: a decision read from disk (a checkpoint, a finished entry) must be the same everywhere, and a
    user error on rank 0 must stop all ranks with the same message instead of leaving them waiting.
    """
    ctx = ctx or current()
    if not ctx.active:
        return fn()
    outcome: tuple[str, Any] | None = None
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except EMMError as exc:
            outcome = ("error", str(exc))
    outcome = broadcast_object(outcome, ctx)
    if outcome[0] == "error":
        raise EMMError(outcome[1])
    return outcome[1]


def all_reduce_sum(t: torch.Tensor, ctx: DistContext | None = None) -> torch.Tensor:
    ctx = ctx or current()
    if ctx.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_ints(value: int, ctx: DistContext | None = None) -> list[int]:
    """Every rank's ``value``, in rank order."""
    ctx = ctx or current()
    if not ctx.active:
        return [value]
    out = [torch.zeros(1, dtype=torch.long, device=ctx.device) for _ in range(ctx.world_size)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.long, device=ctx.device))
    return [int(t.item()) for t in out]


def gather_rows(array: np.ndarray, ctx: DistContext | None = None) -> np.ndarray:
    """Concatenate every rank's rows in rank order, on every rank (shards may differ in length)."""
    ctx = ctx or current()
    if not ctx.active:
        return array
    counts = all_gather_ints(len(array), ctx)
    width = array.shape[1:]
    local = torch.zeros((max(counts), *width), dtype=torch.from_numpy(array[:0]).dtype, device=ctx.device)
    local[:len(array)] = torch.from_numpy(np.ascontiguousarray(array)).to(ctx.device)
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).cpu().numpy()


def sync_buffers(module: nn.Module, ctx: DistContext | None = None) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the *start* of each forward, so after the last step every rank holds its
    own update; doing this at the end of an epoch makes the saved and evaluated weights identical.
    """
    ctx = ctx or current()
    if ctx.active:
        for buf in module.buffers():
            dist.broadcast(buf.data, src=MAIN)


# ---- the model --------------------------------------------------------------------------------------------------
def has_unused_parameters(model: nn.Module, sparse: torch.Tensor, dense: torch.Tensor) -> bool:
    """Does some trainable parameter get no gradient (e.g. the paper's hard argmax fusion gate)?

    DDP must be told (``find_unused_parameters``) or it waits forever for those gradients; telling it
    when not needed costs a graph walk every step. A probe forward/backward in eval mode (no dropout RNG
    drawn, no BatchNorm statistics touched) answers it once.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model):
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(sparse, dense).float().sum().backward()
        unused = any(p.grad is None for p in trainable)
        model.zero_grad(set_to_none=True)
    return unused


def wrap(model: nn.Module, probe: tuple[torch.Tensor, torch.Tensor], ctx: DistContext | None = None) -> nn.Module:
    """The module to train with: DDP around ``model`` when distributed, ``model`` itself otherwise.

    ``model`` keeps being the object to evaluate and save (no ``module.`` prefixes in state dicts).
    """
    ctx = ctx or current()
    if not ctx.active:
        return model
    unused = torch.tensor([float(has_unused_parameters(model, *probe))], device=ctx.device)
    dist.all_reduce(unused, op=dist.ReduceOp.MAX)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=bool(unused.item()))
