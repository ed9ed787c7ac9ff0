"""The level-0 entry (``embedding``): what the fused model's first AKF level receives, and its gate input.

``retrain`` (the paper): a fresh, trainable, shared ``FeatureEmbedding`` produces ``x``. When plan level 0
    is *embedding-only* (every level-0 component's parameterised layers are ``nn.Embedding``: the pool's own
    embeddings), ``x`` replaces level 0 entirely: it is every task's input to level 1 and level 1's gate input,
    so it must have level 0's width. Otherwise the level-0 components still take the raw ``(sparse, dense)``
    and ``x`` is only level 0's gate input.
``reuse``: no embedding of its own. The pool's trained level-0 components (their embeddings) are fused by
    AKF level 0 like any other level, on the raw ``(sparse, dense)``; level 0's gate input is then the mean of
    the level-0 component outputs (``AKFLevel`` takes None for that).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from emm.data.schema import Schema
from emm.errors import EMMError
from emm.fusion.decompose import Plan
from emm.fusion.plan_parts import (dim_from_width, embedding_from_plan, embedding_only_level, flat_width,
                                   level0_embedding, level0_numeric)
from emm.fusion.recipes.base import Recipe, Registry
from emm.models.embedding import FeatureEmbedding

Inputs = list[tuple[Tensor, ...]]


class Level0Entry(Recipe):
    """How the fused model enters its first level. The embedding it returns, if any, is registered on the
    model as ``embedding`` (the state-dict name it has always had) and handed back to ``start``."""

    def schema_embedding(self, plan: Plan, schema: Schema) -> FeatureEmbedding | None:
        """``build_fused``: the embedding to build the model with, sized from the data schema."""
        return None

    def embedding(self, plan: Plan, given: FeatureEmbedding | None) -> FeatureEmbedding | None:
        """The embedding the model keeps (``given``: the caller's, or None)."""
        return None

    def replaces_level0(self, plan: Plan, embedding: FeatureEmbedding | None) -> bool:
        """Whether the embedding stands in for plan level 0 (which is then not fused)."""
        return False

    def gate_dim(self, plan: Plan, embedding: FeatureEmbedding | None) -> int:
        """Width of level 0's gate input, when level 0 is fused."""
        raise NotImplementedError

    def start(self, embedding: FeatureEmbedding | None, replaces_level0: bool, num_tasks: int, sparse: Tensor,
              dense: Tensor) -> tuple[Inputs, list[Tensor] | None]:
        """Every task's input tuple to the first fused level, and its gate inputs (None: the level's mean)."""
        raise NotImplementedError

    def config(self, embedding: FeatureEmbedding | None) -> dict[str, Any] | None:
        """``fused.json``'s ``embedding``: what ``FeatureEmbedding.from_config`` rebuilds it from."""
        return None


ENTRIES: Registry[Level0Entry] = Registry("embedding", Level0Entry)


@ENTRIES.register("retrain")
class RetrainEmbedding(Level0Entry):
    def schema_embedding(self, plan: Plan, schema: Schema) -> FeatureEmbedding:
        table = level0_embedding(plan)
        if table is not None and table.num_embeddings != schema.total_vocab:
            raise EMMError(
                f"the pool's embedding table has {table.num_embeddings} rows but dataset {schema.dataset!r} has "
                f"{schema.total_vocab} sparse values; the pool was trained on another schema: pretrain it again"
            )
        dim = table.embedding_dim if table is not None else dim_from_width(plan, schema)
        return FeatureEmbedding(schema.total_vocab, schema.n_sparse, schema.n_dense, dim, level0_numeric(plan))

    def embedding(self, plan: Plan, given: FeatureEmbedding | None) -> FeatureEmbedding:
        return given if given is not None else embedding_from_plan(plan)

    def replaces_level0(self, plan: Plan, embedding: FeatureEmbedding | None) -> bool:
        if not embedding_only_level(plan, 0):
            return False
        assert embedding is not None
        if embedding.out_dim != flat_width(plan.levels[0].out_shape):
            raise EMMError(
                f"the fresh embedding outputs {embedding.out_dim} values per row but plan level 0 (the pool's "
                f"embeddings) outputs {list(plan.levels[0].out_shape)}; build it with the embedding dimension the "
                "pool models were trained with"
            )
        if plan.num_levels < 2:
            raise EMMError("the plan's only level is the embedding, so with fuse.embedding 'retrain' nothing of "
                           "the pool would be used; set fuse.embedding: reuse or decompose deeper models")
        return True

    def gate_dim(self, plan: Plan, embedding: FeatureEmbedding | None) -> int:
        assert embedding is not None
        return embedding.out_dim

    def start(self, embedding: FeatureEmbedding | None, replaces_level0: bool, num_tasks: int, sparse: Tensor,
              dense: Tensor) -> tuple[Inputs, list[Tensor] | None]:
        assert embedding is not None
        x = embedding(sparse, dense)
        first: tuple[Tensor, ...] = (x,) if replaces_level0 else (sparse, dense)
        return [first] * num_tasks, [x] * num_tasks

    def config(self, embedding: FeatureEmbedding | None) -> dict[str, Any]:
        assert embedding is not None
        emb = embedding.config()
        if emb["numeric"]["mode"] == "minmax":  # the paper's encoding: configs stay as before periodic existed
            del emb["numeric"]
        return emb


@ENTRIES.register("reuse")
class ReuseEmbedding(Level0Entry):
    def embedding(self, plan: Plan, given: FeatureEmbedding | None) -> None:
        if given is not None:
            raise EMMError("an embedding was passed but fuse.embedding is 'reuse' (the pool's own embeddings); "
                           "pass embedding=None, or set fuse.embedding: retrain")
        return None

    def gate_dim(self, plan: Plan, embedding: FeatureEmbedding | None) -> int:
        return flat_width(plan.levels[0].out_shape)

    def start(self, embedding: FeatureEmbedding | None, replaces_level0: bool, num_tasks: int, sparse: Tensor,
              dense: Tensor) -> tuple[Inputs, list[Tensor] | None]:
        return [(sparse, dense)] * num_tasks, None
