"""A fused model on disk, and the one way to load it back.

On disk: ``fused.json`` (pool specs + decompose settings + the architecture, ``FusedModel.config_dict()``)
and ``fused.safetensors`` (the whole state dict, frozen components included). Rebuilding needs no pickle
and no other folder: fresh pool models from their specs are decomposed again on a dummy batch (the plan
depends only on shapes), the fused architecture is rebuilt on that plan, and the weights loaded.

A member imported from outside (a torch-rechub model, your own class) is in ``pool_specs`` as its
portable graph (``emm.models.pool.PortableSpec``: torch.fx nodes over torch.nn layers, as JSON), so it is
rebuilt here with torch alone: the registered fused model scores where its author's code is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from emm.data.schema import Schema, check_fingerprint
from emm.fusion.decompose import decompose
from emm.fusion.fused import FusedModel
from emm.fusion.options import DecomposeConfig
from emm.io import read_json
from emm.models.pool import PortableSpec, build_member, member_spec
from emm.models.single_task import ModelSpec
from emm.weights import load_module

FUSED_JSON, FUSED_WEIGHTS = "fused.json", "fused.safetensors"


def architecture(specs: list[ModelSpec | PortableSpec], dcfg: DecomposeConfig, model: FusedModel) -> dict[str, Any]:
    """What ``build_from_config`` needs to rebuild ``model``: recorded as ``fused.json``'s ``architecture``."""
    return {"pool_specs": [s.model_dump(mode="json") for s in specs], "decompose": dcfg.model_dump(mode="json"),
            "fused": model.config_dict()}


def build_from_config(config: dict[str, Any], schema: Schema) -> FusedModel:
    """Rebuild the fused architecture (weights not loaded) from ``fused.json``'s ``architecture``."""
    specs = [member_spec(s) for s in config["pool_specs"]]
    dcfg = DecomposeConfig.model_validate(config["decompose"])
    models = [build_member(s, schema).eval() for s in specs]
    # every feature at its 'unseen' index: valid for EMM's one table and for per-feature tables alike
    unseen = torch.tensor([[f.offset for f in schema.sparse]], dtype=torch.long).repeat(4, 1)
    dummy = (unseen, torch.zeros(4, schema.n_dense))
    plan = decompose(models, dummy, names=[s.name for s in specs], align=dcfg.align, levels=dcfg.levels,
                     head=dcfg.head)
    return FusedModel.from_config(plan, config["fused"])


def load_fused(fused_dir: Path, schema: Schema) -> tuple[FusedModel, dict[str, Any]]:
    """The saved fused model (eval mode) and its ``fused.json``; the data schema must match."""
    meta = read_json(Path(fused_dir) / FUSED_JSON)
    check_fingerprint(meta["schema_fingerprint"], schema, f"fused model in {fused_dir}")
    model = build_from_config(meta["architecture"], schema)
    load_module(model, Path(fused_dir) / FUSED_WEIGHTS, what=f"fused model in {fused_dir}", fix="run `emm fuse` again")
    return model.eval(), meta
