"""Stage 3, ``decompose``: the trained pool on disk -> a plan + component store on disk, and back.

The example batch that fixes the traced shapes is the first rows of the validation split, so the plan
depends only on the pool and the schema (not on which rows are drawn).
"""

from __future__ import annotations

from pathlib import Path

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.fusion.decompose import Plan, decompose
from emm.fusion.options import DecomposeConfig
from emm.fusion.store import load_plan, save_plan
from emm.models.pool import PoolEntry, load_pool, read_pool
from emm.models.single_task import build_model
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import load_params


def example_batch(data_dir: Path, schema: Schema, rows: int):
    val = load_split(data_dir, "val", schema).head(rows)
    return val.sparse, val.dense


def decompose_pool(data_dir: Path, pool_dir: Path, out_dir: Path, cfg: DecomposeConfig) -> tuple[Plan, list[PoolEntry]]:
    """Decompose every pool model (Algorithm 1) and write the component store to ``out_dir``."""
    schema = Schema.load(data_dir)
    pool = load_pool(pool_dir, schema)
    if len(pool) < 2:
        raise EMMError(f"{pool_dir} holds {len(pool)} model(s); fusion needs a pool of at least 2")
    entries = [e for e, _ in pool]
    plan = decompose([m for _, m in pool], example_batch(data_dir, schema, cfg.example_rows),
                     names=[e.name for e in entries], align=cfg.align, levels=cfg.levels, head=cfg.head)
    save_plan(plan, out_dir, model_names=[e.name for e in entries], tasks=[e.task for e in entries])
    return plan, entries


def load_pool_plan(data_dir: Path, pool_dir: Path, components_dir: Path,
                   cfg: DecomposeConfig) -> tuple[Plan, list[PoolEntry]]:
    """Rebuild the saved plan: fresh models from the pool's specs give the structure, the store the weights."""
    schema = Schema.load(data_dir)
    entries = read_pool(pool_dir)
    models = [build_model(e.spec, schema) for e in entries]
    plan = load_plan(components_dir, models, example_batch(data_dir, schema, cfg.example_rows))
    return plan, entries


def decompose_stage(dataset: str, params: Path | str | None = None) -> tuple[Plan, list[PoolEntry]]:
    cfg = load_params(params)
    return decompose_pool(stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                          stage_dir(cfg, dataset, "components"), cfg.decompose)
