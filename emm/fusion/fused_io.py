"""Saving, rebuilding and training the fused model: stage 4 ``fuse``.

A fused model on disk is ``fused.json`` (pool specs + decompose settings + ``FusedModel.config_dict()``)
and ``fused.safetensors`` (its whole state dict, frozen components included). Rebuilding needs no pickle
and no other folder: fresh pool models from their specs are decomposed again on a dummy batch (the plan
depends only on shapes), the fused architecture is rebuilt on that plan, and the weights loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emm.config import DecomposeConfig, FuseConfig, ScaleConfig, TrackingConfig, params_hash
from emm.data.schema import Schema, check_fingerprint
from emm.data.stream import open_split
from emm.errors import EMMError
from emm.fusion.decompose import decompose
from emm.fusion.fused import FusedModel, build_fused
from emm.fusion.pool_plan import load_pool_plan
from emm.io import atomic_dir, provenance, read_json, write_json
from emm.models.single_task import ModelSpec, build_model
from emm.train.metrics import mean_auc
from emm.train import distributed as ddp
from emm.train.trainer import FitResult, Trainer
from emm.weights import load_module, save_module

log = logging.getLogger(__name__)
FUSED_JSON, FUSED_WEIGHTS = "fused.json", "fused.safetensors"
BUILDER = "emm.fusion.fused_io:build_from_config"


def build_from_config(config: dict[str, Any], schema: Schema) -> FusedModel:
    """Rebuild the fused architecture (weights not loaded) from ``fused.json``'s ``architecture``."""
    specs = [ModelSpec.model_validate(s) for s in config["pool_specs"]]
    dcfg = DecomposeConfig.model_validate(config["decompose"])
    models = [build_model(s, schema).eval() for s in specs]
    dummy = (torch.zeros(4, schema.n_sparse, dtype=torch.long), torch.zeros(4, schema.n_dense))
    plan = decompose(models, dummy, names=[s.name for s in specs], align=dcfg.align, levels=dcfg.levels,
                     head=dcfg.head)
    return FusedModel.from_config(plan, config["fused"])


def load_fused(fused_dir: Path, schema: Schema) -> tuple[FusedModel, dict[str, Any]]:
    meta = read_json(Path(fused_dir) / FUSED_JSON)
    check_fingerprint(meta["schema_fingerprint"], schema, f"fused model in {fused_dir}")
    model = build_from_config(meta["architecture"], schema)
    load_module(model, Path(fused_dir) / FUSED_WEIGHTS, what=f"fused model in {fused_dir}", fix="run `emm fuse` again")
    return model.eval(), meta


@dataclass
class FuseResult:
    model: FusedModel
    fit: FitResult
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    run_id: str | None


def fuse(dataset: str, data_dir: Path, pool_dir: Path, components_dir: Path, out_dir: Path, work_dir: Path,
         cfg: FuseConfig, dcfg: DecomposeConfig, *, tracking: TrackingConfig | None = None, resume: bool = False,
         progress: bool = True, run_name: str | None = None, scale: ScaleConfig | None = None) -> FuseResult:
    """Build the AKF model on the saved components, train it (components frozen), save ``fused/``.

    Under torchrun every rank trains on its shard of the data; rank 0 alone tracks and writes ``fused/``.
    """
    ctx = ddp.current()
    if not ctx.is_main:
        tracking = None
    schema = Schema.load(data_dir)
    plan, entries = load_pool_plan(data_dir, pool_dir, components_dir, dcfg)
    tasks_without_models = [t for t in schema.task_names if t not in {e.task for e in entries}]
    if tasks_without_models:
        raise EMMError(f"task(s) {tasks_without_models} have no model in the pool {[e.name for e in entries]}; "
                       f"add one to pretrain.pool.{dataset} and pretrain again")
    torch.manual_seed(cfg.train.seed)
    model = build_fused(plan, [e.task for e in entries], schema.task_names, cfg, schema)
    rank, world = ctx.shard
    train, val, test = (open_split(data_dir, s, schema, scale, rank=rank, world=world) for s in ("train", "val", "test"))
    architecture = {"pool_specs": [e.spec.model_dump(mode="json") for e in entries],
                    "decompose": dcfg.model_dump(mode="json"), "fused": model.config_dict()}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def train_and_score(on_epoch=None):
        trainer = Trainer(model, cfg.train, checkpoint_dir=Path(work_dir) / "checkpoint",
                          fingerprint=schema.fingerprint(), on_epoch=on_epoch, progress=progress,
                          desc=f"fused[{cfg.ablation}]")
        fit = trainer.fit(train, val, resume=resume)
        return fit, trainer.evaluate(val), trainer.evaluate(test)

    run_id = None
    if tracking is not None:
        from emm import tracking as mt

        mt.use_experiment(dataset, tracking.store)
        with mt.run(run_name or f"fused-{cfg.ablation}", tags={"emm.stage": "fuse"}) as run_id:
            mt.log_params({"ablation": cfg.ablation, "embedding": cfg.embedding, "fusion_gate": cfg.fusion_gate,
                           "attention": cfg.attention, "levels": plan.num_levels, "pool": [e.name for e in entries],
                           "trainable_params": n_trainable, **cfg.train.model_dump()})
            fit, val_m, test_m = train_and_score(
                lambda epoch, row: mt.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch))
            mt.log_metrics({**{f"test_auc_{t}": m["auc"] for t, m in test_m.items()},
                            **{f"best_val_auc_{t}": m["auc"] for t, m in val_m.items()},
                            "mean_test_auc": mean_auc(test_m), "epochs_run": fit.epochs_run})
    else:
        fit, val_m, test_m = train_and_score()

    if not ctx.is_main:
        return FuseResult(model, fit, val_m, test_m, run_id)
    with atomic_dir(out_dir) as tmp:
        save_module(model, tmp / FUSED_WEIGHTS)
        write_json(tmp / FUSED_JSON, {
            "dataset": dataset, "tasks": schema.task_names, "schema_fingerprint": schema.fingerprint(),
            "architecture": architecture, "trainable_params": n_trainable,
            "total_params": sum(p.numel() for p in model.parameters()),
            "fit": {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "seconds": round(fit.seconds, 1)},
            "val": val_m, "test": test_m, "mlflow_run_id": run_id, "gates": model.gate_report(),
            "provenance": provenance(params_hash(cfg)),
        })
    log.info("fused model: test %s", {t: round(m["auc"], 5) for t, m in test_m.items()})
    return FuseResult(model, fit, val_m, test_m, run_id)
