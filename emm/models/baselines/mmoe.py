"""MMoE (Ma et al., KDD 2018): shared experts, one softmax gate per task, one tower per task.

Paper setting (EMM IV-C): 12 experts, matching the 12 components of the fused model; Census experts of
width 16, towers of width 8.
"""

from __future__ import annotations

import torch
from torch import nn

from emm.data.schema import Schema
from emm.models.embedding import FeatureEmbedding
from emm.models.experts import ExpertGroup
from emm.models.single_task import Tower


class MMoE(nn.Module):
    def __init__(self, embedding: FeatureEmbedding, n_tasks: int, n_experts: int = 12,
                 expert_hidden: list[int] | None = None, tower: list[int] | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        expert_hidden = expert_hidden or [16]
        self.embedding = embedding
        d = embedding.out_dim
        self.experts = ExpertGroup(n_experts, d, expert_hidden, dropout)
        self.gates = nn.ModuleList([nn.Linear(d, n_experts) for _ in range(n_tasks)])
        self.towers = nn.ModuleList([Tower(expert_hidden[-1], tower or [8]) for _ in range(n_tasks)])

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = self.embedding(sparse, dense)
        experts = self.experts(x)  # [B, E, H]
        outs = []
        for gate, tower in zip(self.gates, self.towers):
            w = torch.softmax(gate(x), dim=-1).unsqueeze(-1)  # [B, E, 1]
            outs.append(tower((w * experts).sum(dim=1)))
        return torch.cat(outs, dim=1)


def build_mmoe(schema: Schema, n_experts: int = 12, expert_hidden: list[int] | None = None,
               tower: list[int] | None = None, embed_dim: int = 8, numeric: dict | None = None) -> MMoE:
    emb = FeatureEmbedding(schema.total_vocab, schema.n_sparse, schema.n_dense, embed_dim, numeric)
    return MMoE(emb, len(schema.task_names), n_experts, expert_hidden, tower)
