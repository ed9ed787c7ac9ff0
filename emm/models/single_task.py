"""Single-task models: embedding -> body -> tower -> one logit, built from a small JSON-able spec.

Why a spec: weights are saved as plain state dicts (safetensors), so the architecture must be
rebuildable without pickle; the spec is that recipe, stored beside the weights in ``pool.json``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from emm.data.schema import Schema
from emm.models.bodies import CrossNetBody, MLPBody, ResidualMLPBody
from emm.models.embedding import FeatureEmbedding, NumericOptions
from emm.models.names import MemberName


class ModelSpec(BaseModel):
    """One pool member: its task and architecture."""

    model_config = ConfigDict(extra="forbid")

    name: MemberName
    task: str
    arch: Literal["mlp", "dcn", "resmlp"]
    hidden: list[int] = Field(min_length=1, description="block widths of the body (the spine)")
    embed_dim: int = 8
    cross_layers: int = Field(default=2, description="dcn only")
    residual_blocks: int = Field(default=1, description="resmlp only")
    tower: list[int] = Field(default_factory=lambda: [8], description="hidden widths of the task tower")
    dropout: float = 0.1
    batchnorm: bool = False
    numeric: NumericOptions = Field(default_factory=NumericOptions, description="how the dense features are encoded")


class Tower(nn.Module):
    """Task tower: small MLP ending in one logit."""

    def __init__(self, in_dim: int, hidden: list[int], out_dim: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class SingleTaskModel(nn.Module):
    """(sparse, dense) -> logits [B, 1]."""

    def __init__(self, embedding: FeatureEmbedding, body: nn.Module, tower: Tower) -> None:
        super().__init__()
        self.embedding = embedding
        self.body = body
        self.tower = tower

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return self.tower(self.body(self.embedding(sparse, dense)))


def build_body(spec: ModelSpec, in_dim: int) -> nn.Module:
    if spec.arch == "mlp":
        return MLPBody(in_dim, spec.hidden, spec.dropout, spec.batchnorm)
    if spec.arch == "dcn":
        return CrossNetBody(in_dim, spec.cross_layers, spec.hidden, spec.dropout, spec.batchnorm)
    return ResidualMLPBody(in_dim, spec.hidden, spec.residual_blocks, spec.dropout, spec.batchnorm)


def build_model(spec: ModelSpec, schema: Schema) -> SingleTaskModel:
    """A fresh (untrained) model for ``spec`` on the features of ``schema``."""
    embedding = FeatureEmbedding(schema.total_vocab, schema.n_sparse, schema.n_dense, spec.embed_dim, spec.numeric)
    body = build_body(spec, embedding.out_dim)
    return SingleTaskModel(embedding, body, Tower(body.out_dim, spec.tower))
