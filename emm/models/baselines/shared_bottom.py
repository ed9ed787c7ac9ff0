"""Shared-Bottom (Caruana 1997; the multi-task baseline of Ma et al., KDD 2018): one MLP shared by all
tasks, one tower per task.

Paper setting (EMM IV-C): no experts here, so the bottom is one hidden layer as wide as all 12 Census
experts of MMoE together (12 x 16 = 192 units: the same first-layer width and roughly the same parameter
count as the expert layer it is compared with); towers of width 8.
"""

from __future__ import annotations

import torch
from torch import nn

from emm.data.schema import Schema
from emm.models.bodies import MLPBody
from emm.models.embedding import FeatureEmbedding
from emm.models.single_task import Tower


class SharedBottom(nn.Module):
    def __init__(self, embedding: FeatureEmbedding, n_tasks: int, bottom: list[int] | None = None,
                 tower: list[int] | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.embedding = embedding
        self.bottom = MLPBody(embedding.out_dim, bottom or [192], dropout)
        self.towers = nn.ModuleList([Tower(self.bottom.out_dim, tower or [8]) for _ in range(n_tasks)])

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        h = self.bottom(self.embedding(sparse, dense))
        return torch.cat([tower(h) for tower in self.towers], dim=1)


def build_shared_bottom(schema: Schema, bottom: list[int] | None = None, tower: list[int] | None = None,
                        embed_dim: int = 8, numeric: dict | None = None, dropout: float = 0.0) -> SharedBottom:
    emb = FeatureEmbedding(schema.total_vocab, schema.n_sparse, schema.n_dense, embed_dim, numeric)
    return SharedBottom(emb, len(schema.task_names), bottom, tower, dropout)
