"""Single-task bodies: the hidden layers between the embedding and the tower.

Every body is a plain ``nn.Module`` mapping ``[B, in_dim] -> [B, out_dim]``. The default pool gives all
bodies the same *spine* of block widths (e.g. 128 -> 64 -> 16) with different structure around it (an
extra block, a cross network, residual blocks): the pool then shares some layers but not all, as real
pools do, and decomposition finds the shared ones.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp_block(in_dim: int, out_dim: int, dropout: float, batchnorm: bool) -> nn.Sequential:
    """Linear -> (BatchNorm) -> ReLU -> (Dropout): the unit every body is built from."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(out_dim))
    layers.append(nn.ReLU())
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLPBody(nn.Module):
    def __init__(self, in_dim: int, hidden: list[int], dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        dims = [in_dim, *hidden]
        self.blocks = nn.Sequential(*[mlp_block(a, b, dropout, batchnorm) for a, b in zip(dims, dims[1:])])
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class CrossLayer(nn.Module):
    """DCN-v2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l (full-rank W)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class CrossNetBody(nn.Module):
    """DCN-v2, stacked form: explicit feature crosses first, then a deep MLP on the crossed vector."""

    def __init__(self, in_dim: int, cross_layers: int, hidden: list[int], dropout: float = 0.0,
                 batchnorm: bool = False) -> None:
        super().__init__()
        self.cross = nn.ModuleList([CrossLayer(in_dim) for _ in range(cross_layers)])
        self.deep = MLPBody(in_dim, hidden, dropout, batchnorm)
        self.out_dim = self.deep.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, h = x, x
        for layer in self.cross:
            h = layer(x0, h)
        return self.deep(h)


class ResidualBlock(nn.Module):
    """h + MLP(h): two Linear layers of the same width with a skip connection."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.act = nn.ReLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(h + self.inner(h))


class ResidualMLPBody(nn.Module):
    """First block to the spine width, ``residual_blocks`` residual blocks there, then the rest of the spine."""

    def __init__(self, in_dim: int, hidden: list[int], residual_blocks: int = 1, dropout: float = 0.0,
                 batchnorm: bool = False) -> None:
        super().__init__()
        self.stem = mlp_block(in_dim, hidden[0], dropout, batchnorm)
        self.residual = nn.Sequential(*[ResidualBlock(hidden[0], dropout) for _ in range(residual_blocks)])
        self.rest = MLPBody(hidden[0], hidden[1:], dropout, batchnorm)
        self.out_dim = self.rest.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.residual(self.stem(x)))
