"""Model outputs for rows: logits and probabilities from one loop, in eval mode, whatever mode the caller left."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from emm.data.tensors import SplitTensors
from emm.train.predict import predict_logits, predict_proba


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.drop(self.lin(dense)) * 10  # large logits: float32 sigmoids saturate


def test_predict_logits_is_the_pre_sigmoid_of_predict_proba_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = Tiny().train()
    data = SplitTensors(torch.zeros(300, 1, dtype=torch.long), torch.randn(300, 3), torch.zeros(300, 2), ["a", "b"])
    logits = predict_logits(model, data, batch_size=64)
    assert logits.shape == (300, 2) and model.training  # eval inside, the caller's mode back after
    np.testing.assert_array_equal(torch.sigmoid(torch.from_numpy(logits)).numpy(), predict_proba(model, data, 64))
    assert len(np.unique(logits[:, 0])) == 300  # no ties where the probabilities may have them


def test_no_rows_give_an_empty_array_one_column_per_task() -> None:
    data = SplitTensors(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0, 2), ["a", "b"])
    for predict in (predict_logits, predict_proba):
        out = predict(Tiny(), data)
        assert out.shape == (0, 2) and out.dtype == np.float32
