"""A group of same-shaped MLP experts evaluated as one batched computation.

Why: MMoE/PLE/AdaTT run 12 small experts per batch; a Python loop of 12 tiny matmuls is dominated by
per-call overhead on CPU. The experts' first layers share their input, so they are one
``nn.Linear(in, n * width)`` (one GEMM; initialised exactly like n separate ``nn.Linear(in, width)``);
deeper layers have per-expert inputs and run as one batched matmul over ``[n, in, out]`` weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ExpertGroup(nn.Module):
    """``n`` MLP experts (Linear -> ReLU -> Dropout per layer) sharing one input: [B, in] -> [B, n, out]."""

    def __init__(self, n: int, in_dim: int, hidden: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.n = n
        self.first = nn.Linear(in_dim, n * hidden[0])
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(hidden, hidden[1:]):
            w = torch.empty(n, a, b)
            for e in range(n):  # the same init as n separate nn.Linear(a, b)
                nn.init.kaiming_uniform_(w[e].T, a=math.sqrt(5))
            bound = 1 / math.sqrt(a)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-bound, bound)))
        self.dropout = nn.Dropout(dropout)
        self.out_dim = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.relu(self.first(x))).view(x.shape[0], self.n, -1)
        if len(self.weights) == 0:
            return h
        h = h.transpose(0, 1)  # [n, B, width]: one bmm per layer for all experts
        for w, b in zip(self.weights, self.biases):
            h = self.dropout(torch.relu(torch.baddbmm(b, h, w)))
        return h.transpose(0, 1)
