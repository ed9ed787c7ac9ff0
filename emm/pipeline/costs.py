"""What the models of a dataset cost to score, for `emm pool list`: FLOPs per row and parameters.

Pool members are counted here (``emm.train.cost``) on the first rows of the validation split, each model loaded
through the pool's checks, so the number describes the weights in ``pool/`` now. The fused model's is read from
``fused.json``: the fuse stage counted it on validation rows as trained and as saved (pruned, ``emm.fusion.prune``),
and ``emm evaluate`` counts the saved one again on the model it registers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emm.data.schema import SCHEMA_FILE, Schema
from emm.data.stream import open_split
from emm.fusion.saved import FUSED_JSON
from emm.io import read_json
from emm.models.pool import load_pool
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import load_params
from emm.train.cost import ModelCost, model_cost

COST_ROWS = 256  # validation rows each member's FLOPs per row are counted on


def pool_costs(dataset: str, params: Path | str | None = None) -> dict[str, ModelCost]:
    """Member name -> its cost, counted on validation rows (empty when the dataset was never ingested here)."""
    cfg = load_params(params)
    data_dir, pool_dir = stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool")
    if not (data_dir / SCHEMA_FILE).is_file():
        return {}
    schema = Schema.load(data_dir)
    rows = open_split(data_dir, "val", schema, cfg.scale).head(COST_ROWS)
    return {entry.name: model_cost(model, rows.sparse, rows.dense) for entry, model in load_pool(pool_dir, schema)}


def saved_fused_cost(dataset: str, params: Path | str | None = None) -> dict[str, Any] | None:
    """``fused.json``'s ``cost`` (``unpruned``, ``saved``) and what was ``pruned``; None without a fused model, or
    for one saved before its cost was recorded."""
    path = stage_dir(load_params(params), dataset, "fused") / FUSED_JSON
    if not path.is_file():
        return None
    meta = read_json(path)
    if not meta.get("cost"):
        return None
    return {**meta["cost"], "pruned": meta.get("architecture", {}).get("fused", {}).get("pruned")}
