"""What the fused model takes from a decomposition plan: the pool's level-0 embedding table and numeric
encoding (a fresh ``retrain`` embedding copies them), level widths, each level's components as an ablation
wants them (frozen copies, or randomly re-initialised), the ``align="project"`` adapters, and the checks.

Why apart from ``fused.py``: these read a plan and answer "what does the pool offer"; ``FusedModel``
answers "how are the levels wired". Both change for different reasons.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from emm.data.schema import Schema
from emm.errors import EMMError
from emm.fusion.decompose import Plan
from emm.models.embedding import FeatureEmbedding, NumericOptions, PeriodicNumeric

# Embedding width per feature of a fresh ``retrain`` embedding when the plan's level 0 is not the pool's
# embedding (so its width cannot be read off the plan); the zoo's own default.
DEFAULT_EMBEDDING_DIM = 8
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def embedding_only_level(plan: Plan, k: int) -> bool:
    """Whether every level-k component's parameterised layers are all embedding tables."""
    for per_model in plan.components:
        leaves = [m for m in per_model[k].modules()
                  if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None]
        if not leaves or not all(isinstance(m, _EMBEDDING_TYPES) for m in leaves):
            return False
    return True


def reinitialise(module: nn.Module) -> None:
    """Random re-initialisation: ``reset_parameters()`` where a module has one, a generic draw elsewhere."""
    covered: set[int] = set()
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(id(p) for p in m.parameters())
    with torch.no_grad():
        for p in module.parameters():
            if id(p) in covered:
                continue
            if p.dim() >= 2:
                nn.init.xavier_uniform_(p)
            else:
                p.zero_()


def level_components(plan: Plan, k: int, pretrained: bool) -> list[nn.Module]:
    """Copies of every model's level-k component: the trained ones in eval mode (``pretrained``, frozen by
    ``AKFLevel``) or randomly re-initialised and trainable (ablations ``baseline`` and ``+mtm``)."""
    components = [copy.deepcopy(plan.components[i][k]) for i in range(plan.num_models)]
    for c in components:
        if pretrained:
            c.eval()
        else:
            reinitialise(c)
            c.requires_grad_(True)
    return components


def check_levels(plan: Plan) -> None:
    if plan.num_levels < 1:
        raise EMMError("the plan has no level to fuse; decompose the pool models again")
    for level in plan.levels:
        if len(level.out_shape) < 1:
            raise EMMError(f"plan level {level.index} hands on a scalar per row; AKF fuses batch tensors [B, ...]")


def check_tasks(plan: Plan, model_tasks: list[str], task_names: list[str]) -> None:
    if len(model_tasks) != plan.num_models:
        raise EMMError(f"got {len(model_tasks)} model tasks for a plan of {plan.num_models} models "
                       f"({', '.join(plan.names)}); pass the task of each plan model, in plan order")
    if not task_names or len(set(task_names)) != len(task_names):
        raise EMMError(f"task_names must be a non-empty list of distinct tasks, got {task_names}")
    unknown = sorted(set(model_tasks) - set(task_names))
    if unknown:
        raise EMMError(f"plan models are for tasks {unknown} that are not in task_names {task_names}; "
                       "add them or fuse a pool without those models")
    lonely = [t for t in task_names if t not in model_tasks]
    if lonely:
        raise EMMError(f"tasks {lonely} have no model in the pool ({dict(zip(plan.names, model_tasks))}); "
                       "pretrain at least one model per task")


def flat_width(shape: Sequence[int]) -> int:
    """Values per row of a per-row shape (its product)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _level0_module(plan: Plan, kind: type[nn.Module]) -> nn.Module | None:
    """The first module of type ``kind`` inside any model's level-0 component, or None."""
    for per_model in plan.components:
        for m in per_model[0].modules():
            if isinstance(m, kind):
                return m
    return None


def level0_embedding(plan: Plan) -> nn.Embedding | None:
    """The pool's embedding table at level 0 (its size and width), if it has one."""
    return _level0_module(plan, nn.Embedding)


def embedding_from_plan(plan: Plan) -> FeatureEmbedding:
    table = level0_embedding(plan)
    shapes = [tuple(s) for s in plan.input_shapes]
    if table is None or len(shapes) != 2 or len(shapes[0]) != 1 or len(shapes[1]) != 1:
        raise EMMError(
            "fuse.embedding 'retrain' needs a fresh FeatureEmbedding, and none can be derived from this plan (no "
            "embedding table at level 0, or inputs other than (sparse [B, n], dense [B, m])); pass embedding=... "
            "or use build_fused(..., schema)"
        )
    return FeatureEmbedding(table.num_embeddings, shapes[0][0], shapes[1][0], table.embedding_dim,
                            level0_numeric(plan))


def level0_numeric(plan: Plan) -> NumericOptions:
    """The pool's numeric encoding (its level-0 ``PeriodicNumeric``, if any): a fresh embedding sees the dense
    features as the donors did, so its width and its meaning match theirs."""
    encoder = _level0_module(plan, PeriodicNumeric)
    return encoder.opts if encoder is not None else NumericOptions()


def dim_from_width(plan: Plan, schema: Schema) -> int:
    width = flat_width(plan.levels[0].out_shape)
    dim, rest = divmod(width - schema.n_dense, max(schema.n_sparse, 1))
    if not embedding_only_level(plan, 0):
        return DEFAULT_EMBEDDING_DIM
    if rest or dim < 1:
        raise EMMError(f"plan level 0 outputs {width} values per row, which is not n_sparse*dim + n_dense for "
                       f"{schema.n_sparse} sparse and {schema.n_dense} dense features; fuse a pool trained on "
                       f"dataset {schema.dataset!r}")
    return dim


def level_adapters(plan: Plan, k: int) -> tuple[list[nn.Module | None] | None, list[nn.Module | None] | None]:
    """align="project": model i's component at level k takes its own width (unadapt from the common one)
    and its output is adapted to the common width. Copies, trainable."""
    if plan.adapters is None or plan.inverse_adapters is None:
        return None, None
    post = [copy.deepcopy(plan.adapters[i][k]) for i in range(plan.num_models)]
    pre = [copy.deepcopy(plan.inverse_adapters[i][k - 1]) if k > 0 else None for i in range(plan.num_models)]
    for mod in [*post, *pre]:
        if mod is not None:
            mod.requires_grad_(True)
    return pre, post
