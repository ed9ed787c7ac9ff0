"""The export check's two bounds agree with each other: a logit difference the logit bound accepts is not
refused by the probability bound (CI on another CPU saw 1.5e-4 at logit ~0, 0.77x the logit bound, refused
because probabilities differed by 3.9e-5 against a separate 1e-5 bound), and a difference past the logit
bound, or NaN, is still refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emm.pipeline.export import LOGIT_ATOL, agrees, compare


class Zero(torch.nn.Module):
    """Logits 0 for two tasks: where a sigmoid is steepest, so probabilities move most per logit step."""

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(sparse), 2)


class Shifted:
    """An onnxruntime-like session whose logits are off by ``shift``."""

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def run(self, names, feeds):
        return [np.full((len(feeds["sparse"]), 2), self.shift, np.float32)]


def check(shift: float) -> dict[str, float]:
    return compare(Zero(), Shifted(shift), torch.zeros(8, 1, dtype=torch.long), torch.zeros(8, 1))


@pytest.mark.parametrize("fraction", [0.5, 0.77, 0.99])
def test_a_logit_difference_within_its_bound_passes_at_logit_zero(fraction):
    result = check(fraction * LOGIT_ATOL)
    assert result["bound_used"] == pytest.approx(fraction, rel=1e-3)
    assert agrees(result), result


@pytest.mark.parametrize("shift", [1.02 * LOGIT_ATOL, 1e-2, float("nan")])
def test_past_the_logit_bound_or_nan_is_refused(shift):
    assert not agrees(check(shift))
