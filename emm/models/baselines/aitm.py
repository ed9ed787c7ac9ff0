"""AITM (Xi et al., KDD 2021): sequential-dependence multi-task model with Adaptive Information Transfer.

Shared embedding; each task ``t`` has its own bottom network giving ``q_t`` (all bottoms read the same
embedded input, so they run as one ``ExpertGroup``, one "expert" per task). Task 0's tower reads
``z_0 = q_0``. For ``t >= 1`` the AIT module transfers information from the previous task:
``p_{t-1} = Transfer_t(z_{t-1})`` (Linear + ReLU), then attention over the two representations
``u in {p_{t-1}, q_t}``::

    w_u = softmax_u(<h1(u), h2(u)> / sqrt(H)),    z_t = sum_u w_u * h3(u)

with ``h1, h2, h3`` linear maps (per task). Task ``t``'s tower reads ``z_t``. Information thus flows only
forward along the task order of the schema (e.g. click -> conversion), never backward.

Simplification: the paper's *behavioural expectation calibrator* (an extra loss term penalising
``y_t > y_{t-1}`` on the predicted probabilities) is not implemented: every baseline here returns logits
and is trained by the shared trainer with the plain sum of per-task BCE losses, and the Census tasks have
no funnel order for which the calibrator's inequality would hold.

Paper setting (EMM IV-C): bottoms of width 16 (the Census expert width), towers of width 8.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from emm.data.schema import Schema
from emm.models.embedding import FeatureEmbedding
from emm.models.experts import ExpertGroup
from emm.models.single_task import Tower


class AIT(nn.Module):
    """Adaptive Information Transfer: attention over [transferred p_{t-1}, own q_t] -> z_t."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.transfer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
        self.h1, self.h2, self.h3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, prev_z: torch.Tensor, own_q: torch.Tensor) -> torch.Tensor:
        u = torch.stack([self.transfer(prev_z), own_q], dim=1)  # [B, 2, H]
        w = torch.softmax((self.h1(u) * self.h2(u)).sum(-1) * self.scale, dim=1)  # [B, 2]
        return (w.unsqueeze(-1) * self.h3(u)).sum(dim=1)


class AITM(nn.Module):
    def __init__(self, embedding: FeatureEmbedding, n_tasks: int, expert_hidden: list[int] | None = None,
                 tower: list[int] | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        expert_hidden = expert_hidden or [16]
        self.embedding = embedding
        self.bottoms = ExpertGroup(n_tasks, embedding.out_dim, expert_hidden, dropout)
        h = expert_hidden[-1]
        self.ait = nn.ModuleList([AIT(h) for _ in range(n_tasks - 1)])  # ait[t-1] feeds task t
        self.towers = nn.ModuleList([Tower(h, tower or [8]) for _ in range(n_tasks)])

    def forward_with_reps(self, sparse: torch.Tensor, dense: torch.Tensor
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits [B, T] and the tower inputs ``z_t`` (for inspecting the information flow)."""
        q = self.bottoms(self.embedding(sparse, dense))  # [B, T, H]
        z = [q[:, 0]]
        for t, ait in enumerate(self.ait, start=1):
            z.append(ait(z[-1], q[:, t]))
        return torch.cat([tower(z_t) for tower, z_t in zip(self.towers, z)], dim=1), z

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.forward_with_reps(sparse, dense)[0]


def build_aitm(schema: Schema, expert_hidden: list[int] | None = None, tower: list[int] | None = None,
               embed_dim: int = 8, numeric: dict | None = None, dropout: float = 0.0) -> AITM:
    """Tasks are chained in the schema's task order."""
    emb = FeatureEmbedding(schema.total_vocab, schema.n_sparse, schema.n_dense, embed_dim, numeric)
    return AITM(emb, len(schema.task_names), expert_hidden, tower, dropout)
