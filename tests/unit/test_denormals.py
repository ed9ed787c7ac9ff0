"""Training flushes denormal floats (x86 computes them many times slower, so epochs slowed as weights decayed)
and leaves the process as it found it: inside a fit a denormal product is 0, outside it is not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emm.data.tensors import SplitTensors
from emm.train.denormals import flush_denormals, flushing
from emm.train.options import TrainConfig
from emm.train.trainer import Trainer


class Probe(nn.Module):
    """A one-logit model that records, on every training forward, whether denormals are flushed."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.seen: list[bool] = []

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.append(flushing())
        return self.linear(dense)


def split(rows: int, seed: int) -> SplitTensors:
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(rows, 2, generator=g)
    labels = (dense[:, :1] > 0.5).float()
    return SplitTensors(torch.zeros(rows, 1, dtype=torch.long), dense, labels, ["t"])


@pytest.fixture
def ieee():
    """The process in IEEE mode (denormals kept), skipping where the CPU cannot flush them."""
    if not torch.set_flush_denormal(True):  # pragma: no cover - a CPU without flush-to-zero
        pytest.skip("this CPU cannot flush denormals")
    torch.set_flush_denormal(False)
    assert not flushing()  # 1e-30 * 1e-10 is a denormal, not 0
    yield
    torch.set_flush_denormal(False)


def test_a_fit_flushes_denormals_and_restores_the_process_setting(ieee):
    model = Probe()
    Trainer(model, TrainConfig(max_epochs=2, batch_size=32, device="cpu"), progress=False).fit(split(64, 0), split(32, 1))
    assert len(model.seen) == 4 and all(model.seen)
    assert not flushing()


def test_a_caller_that_flushes_keeps_flushing(ieee):
    with flush_denormals():
        with flush_denormals():
            pass
        assert flushing()
    assert not flushing()
