"""fx tracing while other threads run models (Prefect runs pool members as threads of one process).

Regression: an outside model traced at import patched ``nn.Module.__call__`` process-wide, so a member
being evaluated in the next thread failed with "module is not installed as a submodule".
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from emm.fusion.decompose.fx_reader import _symbolic_trace
from emm.models.portable import trace

WAIT_S = 10.0


class Pausing(nn.Module):
    """A model whose forward calls ``hook`` (plain Python, run once while it is traced)."""

    def __init__(self, hook: Callable[[], None]) -> None:
        super().__init__()
        self.hook = hook
        self.inner = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hook()
        return self.inner(x)


def paused_trace(run_trace: Callable[[nn.Module], object], while_paused: Callable[[], None]) -> object:
    """Run ``run_trace`` in a thread, and ``while_paused`` here while that trace is inside the forward."""
    inside, release, out = threading.Event(), threading.Event(), {}

    def hook() -> None:
        inside.set()
        assert release.wait(WAIT_S)

    def target() -> None:
        try:
            out["result"] = run_trace(Pausing(hook))
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            out["error"] = exc

    tracer = threading.Thread(target=target)
    tracer.start()
    assert inside.wait(WAIT_S)
    try:
        while_paused()
    finally:
        release.set()
        tracer.join(WAIT_S)
    if "error" in out:
        raise out["error"]
    return out["result"]


def other_thread_model_runs() -> Callable[[], None]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(6, 3)
    with torch.no_grad():
        want = model(x)

    def run() -> None:
        with torch.no_grad():
            got = model(x)  # from the main thread, while the other thread's trace is patched in
        assert torch.equal(got, want)
        assert model[0].weight.shape == (5, 3)  # attribute reads pass through too

    return run


def test_model_runs_in_another_thread_while_a_portable_trace_is_in_progress():
    gm = paused_trace(lambda m: trace(m, [torch.randn(2, 4)], name="outside", class_name="Pausing"),
                      other_thread_model_runs())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["inner.0", "inner.1", "inner.2"]  # the trace recorded its own layers, none of the other thread's


def test_model_runs_in_another_thread_while_decomposition_traces():
    gm, opaque = paused_trace(_symbolic_trace, other_thread_model_runs())
    assert opaque == []  # the other thread's calls were not taken for a failing module of ours
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["inner.0", "inner.1", "inner.2"]


def test_two_traces_take_turns_and_leave_module_call_restored():
    original_call, order = nn.Module.__call__, []
    second_in = threading.Event()

    def second_trace() -> None:
        def hook() -> None:
            order.append("second")
            second_in.set()
        _symbolic_trace(Pausing(hook))

    worker = threading.Thread(target=second_trace)

    def while_first_paused() -> None:
        order.append("first paused")
        worker.start()
        second_in.wait(1.0)  # it must not get in while the first trace holds the patches
        order.append("first resumes")

    paused_trace(_symbolic_trace, while_first_paused)
    worker.join(WAIT_S)
    assert order == ["first paused", "first resumes", "second"]
    assert nn.Module.__call__ is original_call
