"""A traced graph that matches the model up to float32 rounding is accepted (a multithreaded kernel may sum in
another order between two calls: CI once refused a correct DCN trace on bit-equality); one whose Python branch
was frozen at trace time is still refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emm.fusion.decompose.fx_reader import FxProgram
from emm.fusion.decompose.layers import Untraceable
from emm.models.tracing import reproduces


class Jitter(nn.Module):
    """Adds rounding-sized noise on every call: the model's own output and its trace differ in the last bits."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h + 1e-7 * torch.rand_like(h))


def test_rounding_differences_are_accepted_and_large_ones_are_not():
    want = torch.randn(64, 1) * 8
    assert reproduces(want + 1e-6 * torch.rand_like(want), want)
    assert not reproduces(want + 1e-2, want)
    assert not reproduces(want[:32], want)
    assert not reproduces((want,), want)


def test_a_trace_equal_up_to_rounding_is_read():
    torch.manual_seed(0)
    model = Jitter().eval()
    x = torch.randn(32, 4)
    with torch.no_grad():
        expected = model(x)
    FxProgram.read(model, (x,), expected)  # bit-equality refused this


def test_a_trace_that_differs_is_still_refused():
    model = Jitter().eval()
    x = torch.randn(32, 4)
    with torch.no_grad():
        expected = model(x) + 0.5
    with pytest.raises(Untraceable, match="does not reproduce"):
        FxProgram.read(model, (x,), expected)
