"""AdaTT-sp (Li et al., KDD 2023): adaptive task-to-task fusion with task-specific experts only.

Each fusion level holds ``n_specific`` experts per task (no shared experts: the "-sp" variant). Task
``t``'s fusion unit combines

* a softmax gate, read from task ``t``'s input of the level, over *all* tasks' experts (the adaptive
  task-to-task transfer), and
* a residual: a learned linear combination ``v_t`` of task ``t``'s own experts (the native-expert
  term; weights start at 1, and with one expert per task it is the plain expert output),

summed. At the first level every expert reads the embedded input (one ``ExpertGroup`` for all); at later
levels task ``t``'s experts read task ``t``'s previous fusion output. The last level's outputs feed the
towers.

Paper setting (EMM IV-C): two fusion levels of 12 experts each (``n_experts // n_tasks`` per task:
6 + 6 for 2 tasks), Census experts of width 16, towers of width 8.
"""

from __future__ import annotations

import torch
from torch import nn

from emm.data.schema import Schema
from emm.models.embedding import FeatureEmbedding
from emm.models.experts import ExpertGroup
from emm.models.single_task import Tower


class AdaTTLevel(nn.Module):
    def __init__(self, in_dim: int, n_tasks: int, n_specific: int, hidden: list[int], dropout: float,
                 first: bool) -> None:
        super().__init__()
        self.n_tasks, self.n_specific, self.first = n_tasks, n_specific, first
        if first:  # experts ordered [task 0 x m, task 1 x m, ...]
            self.all_experts = ExpertGroup(n_tasks * n_specific, in_dim, hidden, dropout)
        else:
            self.task_experts = nn.ModuleList([ExpertGroup(n_specific, in_dim, hidden, dropout)
                                               for _ in range(n_tasks)])
        self.gates = nn.ModuleList([nn.Linear(in_dim, n_tasks * n_specific) for _ in range(n_tasks)])
        self.residual = nn.Parameter(torch.ones(n_tasks, n_specific))  # v_t over task t's own experts
        self.out_dim = hidden[-1]

    def forward(self, task_in: list[torch.Tensor]) -> list[torch.Tensor]:
        m = self.n_specific
        if self.first:
            every = self.all_experts(task_in[0])  # [B, T*m, H]
        else:
            every = torch.cat([group(x) for group, x in zip(self.task_experts, task_in)], dim=1)
        outs = []
        for t, (gate, x) in enumerate(zip(self.gates, task_in)):
            w = torch.softmax(gate(x), dim=-1).unsqueeze(-1)  # [B, T*m, 1]
            own = every[:, t * m:(t + 1) * m]  # [B, m, H]
            residual = (self.residual[t].view(1, m, 1) * own).sum(dim=1)
            outs.append((w * every).sum(dim=1) + residual)
        return outs


class AdaTT(nn.Module):
    def __init__(self, embedding: FeatureEmbedding, n_tasks: int, n_levels: int = 2, n_specific: int = 6,
                 expert_hidden: list[int] | None = None, tower: list[int] | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        expert_hidden = expert_hidden or [16]
        self.embedding = embedding
        in_dim = embedding.out_dim
        levels = []
        for level in range(n_levels):
            levels.append(AdaTTLevel(in_dim, n_tasks, n_specific, expert_hidden, dropout, first=level == 0))
            in_dim = expert_hidden[-1]
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleList([Tower(in_dim, tower or [8]) for _ in range(n_tasks)])

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = self.embedding(sparse, dense)
        h: list[torch.Tensor] = [x] * len(self.towers)
        for level in self.levels:
            h = level(h)
        return torch.cat([tower(h_t) for tower, h_t in zip(self.towers, h)], dim=1)


def build_adatt(schema: Schema, n_experts: int = 12, n_levels: int = 2, n_specific: int | None = None,
                expert_hidden: list[int] | None = None, tower: list[int] | None = None, embed_dim: int = 8,
                numeric: dict | None = None, dropout: float = 0.0) -> AdaTT:
    """``n_experts`` per level, split evenly between the tasks unless ``n_specific`` is given."""
    n_tasks = len(schema.task_names)
    emb = FeatureEmbedding(schema.total_vocab, schema.n_sparse, schema.n_dense, embed_dim, numeric)
    m = n_specific if n_specific is not None else max(1, n_experts // n_tasks)
    return AdaTT(emb, n_tasks, n_levels, m, expert_hidden, tower, dropout)
