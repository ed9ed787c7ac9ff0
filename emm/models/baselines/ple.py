"""PLE (Tang et al., RecSys 2020): stacked CGC levels of task-specific and shared experts.

Each CGC level holds ``n_shared`` shared experts and ``n_specific`` experts per task. Task ``t``'s gate
(a softmax over its own experts plus the shared ones) mixes them into task ``t``'s output of that level;
every level but the last also has a shared gate over *all* experts, whose mixture is the input of the next
level's shared experts. At the first level every expert reads the embedded input; at later levels task
``t``'s experts (and gate) read task ``t``'s previous output and the shared experts (and gate) read the
previous shared output. The last level's task outputs feed the towers.

Paper setting (EMM IV-C): two CGC levels of 12 experts each, matching the 12 fused components. By
default the 12 are split evenly between the shared group and each task's group:
``n_experts // (n_tasks + 1)`` each (2 tasks: 4 shared + 4 + 4); Census experts of width 16, towers of
width 8.
"""

from __future__ import annotations

import torch
from torch import nn

from emm.data.schema import Schema
from emm.models.embedding import FeatureEmbedding
from emm.models.experts import ExpertGroup
from emm.models.single_task import Tower


def _mix(gate_logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum of experts: [B, E] logits, [B, E, H] experts -> [B, H]."""
    return (torch.softmax(gate_logits, dim=-1).unsqueeze(-1) * experts).sum(dim=1)


class CGCLevel(nn.Module):
    """One Customized Gate Control level: (task inputs, shared input) -> (task outputs, shared output).

    With ``first=True`` all inputs are the same tensor, so all experts run as one ``ExpertGroup``;
    otherwise each task's experts and the shared experts are separate groups on their own inputs.
    """

    def __init__(self, in_dim: int, n_tasks: int, n_shared: int, n_specific: int, hidden: list[int],
                 dropout: float, first: bool, shared_out: bool) -> None:
        super().__init__()
        self.n_tasks, self.n_shared, self.n_specific = n_tasks, n_shared, n_specific
        self.first, self.shared_out = first, shared_out
        if first:  # one GEMM: experts ordered [shared, task 0, task 1, ...]
            self.all_experts = ExpertGroup(n_shared + n_tasks * n_specific, in_dim, hidden, dropout)
        else:
            self.shared_experts = ExpertGroup(n_shared, in_dim, hidden, dropout)
            self.task_experts = nn.ModuleList([ExpertGroup(n_specific, in_dim, hidden, dropout)
                                               for _ in range(n_tasks)])
        self.task_gates = nn.ModuleList([nn.Linear(in_dim, n_specific + n_shared) for _ in range(n_tasks)])
        self.shared_gate = nn.Linear(in_dim, n_shared + n_tasks * n_specific) if shared_out else None
        self.out_dim = hidden[-1]

    def forward(self, task_in: list[torch.Tensor], shared_in: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        s, m = self.n_shared, self.n_specific
        if self.first:
            every = self.all_experts(shared_in)  # [B, S + T*m, H]
            shared = every[:, :s]
            own = [every[:, s + t * m: s + (t + 1) * m] for t in range(self.n_tasks)]
        else:
            shared = self.shared_experts(shared_in)
            own = [group(x) for group, x in zip(self.task_experts, task_in)]
        outs = [_mix(gate(x), torch.cat([own_t, shared], dim=1))
                for gate, x, own_t in zip(self.task_gates, task_in, own)]
        shared_next = None
        if self.shared_gate is not None:
            shared_next = _mix(self.shared_gate(shared_in), torch.cat([shared, *own], dim=1))
        return outs, shared_next


class PLE(nn.Module):
    def __init__(self, embedding: FeatureEmbedding, n_tasks: int, n_levels: int = 2, n_shared: int = 4,
                 n_specific: int = 4, expert_hidden: list[int] | None = None, tower: list[int] | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        expert_hidden = expert_hidden or [16]
        self.embedding = embedding
        in_dim = embedding.out_dim
        levels = []
        for level in range(n_levels):
            levels.append(CGCLevel(in_dim, n_tasks, n_shared, n_specific, expert_hidden, dropout,
                                   first=level == 0, shared_out=level < n_levels - 1))
            in_dim = expert_hidden[-1]
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleList([Tower(in_dim, tower or [8]) for _ in range(n_tasks)])

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x = self.embedding(sparse, dense)
        task_h: list[torch.Tensor] = [x] * len(self.towers)
        shared_h = x
        for level in self.levels:
            task_h, shared_next = level(task_h, shared_h)
            if shared_next is not None:  # None after the last level
                shared_h = shared_next
        return torch.cat([tower(h) for tower, h in zip(self.towers, task_h)], dim=1)


def build_ple(schema: Schema, n_experts: int = 12, n_levels: int = 2, n_shared: int | None = None,
              n_specific: int | None = None, expert_hidden: list[int] | None = None,
              tower: list[int] | None = None, embed_dim: int = 8, numeric: dict | None = None,
              dropout: float = 0.0) -> PLE:
    """``n_experts`` per level, split evenly between the shared group and each task's group unless
    ``n_shared``/``n_specific`` are given."""
    n_tasks = len(schema.task_names)
    even = max(1, n_experts // (n_tasks + 1))
    emb = FeatureEmbedding(schema.total_vocab, schema.n_sparse, schema.n_dense, embed_dim, numeric)
    return PLE(emb, n_tasks, n_levels, n_shared if n_shared is not None else even,
               n_specific if n_specific is not None else even, expert_hidden, tower, dropout)
