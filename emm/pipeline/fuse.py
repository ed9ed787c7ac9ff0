"""Stage 4, ``fuse``: build the AKF model on the saved components, train it (components frozen), write ``fused/``.

What lands in ``fused/`` is described in ``emm.fusion.saved`` (the one loader); this stage adds the
training record (fit, val/test metrics, gates, the MLflow run) to ``fused.json``.

``--resume`` continues ``fused-work/checkpoint`` only when it was made from the same fuse and decompose
settings and the same pool and components (``fuse_made_from``): the checkpoint holds the frozen
components too, so resuming one from an older pool would bring the old pool back into ``fused/``.

For the same reason the pool is checked and loaded (``load_pool_plan``: digests, signatures, finite
weights), components cut from another pool are refused, and ``fused.json`` records the pool it was fused
from (``made_from``), for evaluate to refuse a fused model that another pool left behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from emm.data.options import ScaleConfig
from emm.data.schema import Schema
from emm.data.stream import open_split
from emm.errors import EMMError
from emm.fusion.blend import DonorEnsemble, fit_blend
from emm.fusion.fused import FusedModel, build_fused
from emm.fusion.options import DecomposeConfig
from emm.fusion.saved import FUSED_JSON, FUSED_WEIGHTS, architecture
from emm.io import atomic_dir, digest, provenance, read_json, tree_digest, write_json
from emm.models.pool import pool_digest
from emm.pipeline.decompose import load_pool_plan, stage_pool_signatures
from emm.pipeline.layout import stage_dir, stage_tracker
from emm.pipeline.params import FuseConfig, load_params
from emm.tracker import NullTracker, Tracker
from emm.train import distributed as ddp
from emm.train.distill import Distillation
from emm.train.metrics import mean_auc
from emm.train.trainer import FitResult, Trainer
from emm.weights import save_module

log = logging.getLogger(__name__)
STACK_ROWS = 1_000_000  # validation rows the donor stack is fitted on (all of them on Census-size data)


@dataclass
class FuseResult:
    model: FusedModel
    fit: FitResult
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    run_id: str | None


def fuse_made_from(pool: str, components_dir: Path, cfg: FuseConfig, dcfg: DecomposeConfig) -> dict:
    """What a fuse checkpoint is made from besides the train settings and the schema (the trainer adds
    those): the AKF architecture, the decompose settings, and the pool (``pool``: its ``pool_digest``) and
    components it froze (digests cut to ``digest``'s usual 16 hex digits, enough to tell artifacts apart
    and short in the log)."""
    return {"fuse": cfg.akf.model_dump(mode="json"), "decompose": dcfg.model_dump(mode="json"),
            "pool": pool, "components": tree_digest([Path(components_dir)])[:16]}


def fuse(dataset: str, data_dir: Path, pool_dir: Path, components_dir: Path, out_dir: Path, work_dir: Path,
         cfg: FuseConfig, dcfg: DecomposeConfig, *, tracker: Tracker | None = None, resume: bool = False,
         progress: bool = True, scale: ScaleConfig | None = None,
         expected: dict[str, dict] | None = None) -> FuseResult:
    """Train the fused model on the pool's components and save ``fused/``.

    Under torchrun every rank trains on its shard of the data; rank 0 alone tracks and writes ``fused/``.
    ``expected``: the signatures the params' pool gives (``stage_pool_signatures``), checked against pool.json.
    """
    ctx = ddp.current()
    tracker = tracker or NullTracker()
    schema = Schema.load(data_dir)
    plan, entries = load_pool_plan(data_dir, pool_dir, components_dir, dcfg, expected=expected)
    pool = pool_digest(entries)  # in plan order, as decompose recorded it in the components
    tasks_without_models = [t for t in schema.task_names if t not in {e.task for e in entries}]
    if tasks_without_models:
        raise EMMError(f"task(s) {tasks_without_models} have no model in the pool {[e.name for e in entries]}; "
                       f"add one to pretrain.pool.{dataset} and pretrain again")
    torch.manual_seed(cfg.train.seed)
    model = build_fused(plan, [e.task for e in entries], schema.task_names, cfg.akf, schema)
    blend = None
    if model.blend is not None and cfg.blend_init == "stack":  # every rank fits on the same (whole) val rows
        rows = open_split(data_dir, "val", schema, scale).head(STACK_ROWS)
        blend = fit_blend(model, rows.sparse, rows.dense, rows.labels)
        log.info("donor blend (stack on %d val rows): %s", len(rows), blend)
    rank, world = ctx.shard
    train, val, test = (open_split(data_dir, s, schema, scale, rank=rank, world=world) for s in ("train", "val", "test"))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracker.log_params({**cfg.akf.model_dump(), "levels": plan.num_levels, "pool": [e.name for e in entries],
                        "trainable_params": n_trainable, "distill": cfg.distill, **cfg.train.model_dump()})
    distill = (Distillation(DonorEnsemble(plan, [e.task for e in entries], schema.task_names), cfg.distill)
               if cfg.distill > 0 else None)
    trainer = Trainer(model, cfg.train, checkpoint_dir=Path(work_dir) / "checkpoint", fingerprint=schema.fingerprint(),
                      made_from=fuse_made_from(pool, components_dir, cfg, dcfg), tracker=tracker,
                      progress=progress, desc=f"fused[{cfg.ablation}]", score_start=model.blend is not None,
                      distill=distill)
    fit = trainer.fit(train, val, resume=resume)
    finetune = None
    if cfg.finetune_lr_scale is not None:
        fit, finetune, trainer = _finetune(model, fit, train, val, cfg, schema, work_dir, trainer.made_from,
                                           tracker=tracker, resume=resume, progress=progress, distill=distill)
    val_m, test_m = trainer.evaluate(val), trainer.evaluate(test)
    tracker.log_metrics({**{f"test_auc_{t}": m["auc"] for t, m in test_m.items()},
                         **{f"best_val_auc_{t}": m["auc"] for t, m in val_m.items()},
                         "mean_test_auc": mean_auc(test_m), "epochs_run": fit.epochs_run})
    if not ctx.is_main:
        return FuseResult(model, fit, val_m, test_m, tracker.run_id)
    with atomic_dir(out_dir) as tmp:
        save_module(model, tmp / FUSED_WEIGHTS)
        write_json(tmp / FUSED_JSON, {
            "dataset": dataset, "tasks": schema.task_names, "schema_fingerprint": schema.fingerprint(),
            "architecture": architecture([e.spec for e in entries], dcfg, model), "trainable_params": n_trainable,
            "total_params": sum(p.numel() for p in model.parameters()),
            "fit": {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "seconds": round(fit.seconds, 1)},
            "val": val_m, "test": test_m, "mlflow_run_id": tracker.run_id, "gates": model.gate_report(),
            "blend_init": blend, "history": fit.history, "finetune": finetune, "distill": cfg.distill,
            "made_from": {"pool": pool},
            "provenance": provenance(digest(cfg)),
        })
    log.info("fused model: test %s", {t: round(m["auc"], 5) for t, m in test_m.items()})
    return FuseResult(model, fit, val_m, test_m, tracker.run_id)


def _finetune(model: FusedModel, first: FitResult, train, val, cfg: FuseConfig, schema: Schema, work_dir: Path,
              made_from: dict, *, tracker: Tracker, resume: bool, progress: bool,
              distill: Distillation | None) -> tuple[FitResult, dict, Trainer]:
    """Phase 2 of linear-probe-then-fine-tune: the pool's parameters thawed, everything at lr x scale.

    The phase starts from phase 1's best weights and scores them first (``score_start``), so early
    stopping can only hand back a model at least as good on validation as phase 1's. Returns the two
    phases as one fit (epochs numbered on from phase 1's), a record for ``fused.json``, and the trainer.
    """
    thawed = model.unfreeze_pool()
    train_cfg = cfg.train.model_copy(update={"lr": cfg.train.lr * cfg.finetune_lr_scale})
    trainer = Trainer(model, train_cfg, checkpoint_dir=Path(work_dir) / "checkpoint-finetune",
                      fingerprint=schema.fingerprint(), made_from={**made_from, "phase": "finetune"},
                      tracker=tracker, progress=progress, desc=f"fused[{cfg.ablation}] fine-tune",
                      score_start=True, distill=distill, first_step=first.epochs_run)
    second = trainer.fit(train, val, resume=resume)
    offset = first.epochs_run
    history = first.history + [{**row, "epoch": row["epoch"] + offset, "phase": "finetune"}
                               for row in second.history if row["epoch"] > 0]
    best_epoch = first.best_epoch if second.best_epoch == 0 else offset + second.best_epoch
    record = {"lr": train_cfg.lr, "thawed_params": sum(p.numel() for p in thawed), "first_phase_epochs": offset,
              "first_phase_best_val_auc": first.best_val_auc, "best_val_auc": second.best_val_auc,
              "kept": "finetune" if second.best_epoch > 0 else "first phase"}
    log.info("fine-tune at lr %.2g: %s (val AUC %.5f -> %.5f)", train_cfg.lr, record["kept"], first.best_val_auc,
             second.best_val_auc)
    fit = FitResult(best_epoch=best_epoch, best_val_auc=second.best_val_auc, epochs_run=offset + second.epochs_run,
                    stopped_early=second.stopped_early, seconds=first.seconds + second.seconds, history=history)
    return fit, record, trainer


def fuse_stage(dataset: str, params: Path | str | None = None, *, resume: bool = False, track: bool = True,
               progress: bool = True) -> FuseResult:
    """Train the fused model; under ``torchrun`` (WORLD_SIZE > 1) as one DDP run, rank 0 writing."""
    cfg = load_params(params)
    with ddp.session(cfg.scale), stage_tracker(cfg.tracking, dataset, f"fused-{cfg.fuse.ablation}", enabled=track,
                                               tags={"emm.stage": "fuse"}) as tracker:
        return fuse(dataset, stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                    stage_dir(cfg, dataset, "components"), stage_dir(cfg, dataset, "fused"),
                    stage_dir(cfg, dataset, "fused-work"), cfg.fuse, cfg.decompose, tracker=tracker, resume=resume,
                    progress=progress, scale=cfg.scale, expected=stage_pool_signatures(cfg, dataset))


def fuse_summary(dataset: str, params: Path | str | None = None) -> dict[str, float]:
    """Test AUC per task of the saved fused model (what the fuse stage reported), read from ``fused/``."""
    cfg = load_params(params)
    meta = read_json(stage_dir(cfg, dataset, "fused") / FUSED_JSON)
    return {t: m["auc"] for t, m in meta["test"].items()}
