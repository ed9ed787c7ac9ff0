"""What does a model say about these rows? Its logits or probabilities [N, T], in eval mode, batch by batch.

Why one loop for both: logits and probabilities must come from the same rows, batches and mode; the
only difference is the link applied to each batch on the model's device (none, or a sigmoid).
Why logits at all: float32 sigmoids of confident rows round to exactly 1.0, and a mean or a regression
of such values loses their order; comparisons and stacks work on logits, users get probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from emm.data.stream import ParquetStream
from emm.data.tensors import SplitTensors
from emm.train.modes import eval_mode

Link = Callable[[torch.Tensor], torch.Tensor]


def _identity(logits: torch.Tensor) -> torch.Tensor:
    return logits


@torch.no_grad()
def _scores(model: nn.Module, data: SplitTensors, batch_size: int, device: torch.device | None,
            link: Link) -> np.ndarray:
    device = device or next(model.parameters()).device
    out = []
    with eval_mode(model):
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            out.append(link(model(data.sparse[sl].to(device), data.dense[sl].to(device))).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, data.labels.shape[1]), np.float32)


def predict_logits(model: nn.Module, data: SplitTensors, batch_size: int = 65536,
                   device: torch.device | None = None) -> np.ndarray:
    """Raw logits [N, T] in eval mode, batch by batch."""
    return _scores(model, data, batch_size, device, _identity)


def predict_proba(model: nn.Module, data: SplitTensors, batch_size: int = 65536,
                  device: torch.device | None = None) -> np.ndarray:
    """Sigmoid probabilities [N, T], in eval mode, batch by batch."""
    return _scores(model, data, batch_size, device, torch.sigmoid)


@torch.no_grad()
def predict_stream(model: nn.Module, data: ParquetStream, batch_size: int = 65536,
                   device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, T], labels [N, T]) over a stream, in file order; memory: one batch + the outputs."""
    device = device or next(model.parameters()).device
    probs, labels = [], []
    with eval_mode(model):
        for batch in data.batches(batch_size):
            probs.append(torch.sigmoid(model(batch.sparse.to(device), batch.dense.to(device))).float().cpu())
            labels.append(batch.labels)
    if not probs:
        empty = np.zeros((0, len(data.task_names)), np.float32)
        return empty, empty
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()
