"""Stage 2, ``pretrain``: train the single-task model pool, track it in MLflow, write ``pool/``.

Each model trains in its own work folder (``<artifacts>/<dataset>/pool-work/<name>/``) that holds its
per-epoch checkpoint and, once done, its weights and entry. So ``--resume`` after a kill skips finished
models and continues the interrupted one from its last epoch; and Prefect can train pool members as
concurrent tasks. ``pool/`` itself is assembled atomically at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import torch

from emm.config import PretrainConfig, ScaleConfig, TrackingConfig, params_hash
from emm.data.schema import Schema
from emm.data.stream import open_split
from emm.errors import EMMError
from emm.io import atomic_dir, provenance, write_json
from emm.models.pool import POOL_FILE, PoolEntry
from emm.models.single_task import ModelSpec, build_model
from emm.train import distributed as ddp
from emm.train.trainer import Trainer
from emm.weights import save_module

log = logging.getLogger(__name__)
ALTERNATES = ("dcn", "resmlp", "mlp-deep")
DEFAULT_SPINE = [128, 64, 16]
_SEEDED_BUILD = threading.Lock()


def default_pool(task_names: list[str], spine: list[int] | None = None) -> list[dict]:
    """Two models per task: a plain MLP (the paper's TM) and one other structure, cycling through
    DCN-v2, residual MLP and a deeper MLP, all around the same spine of widths."""
    spine = spine or DEFAULT_SPINE
    specs = []
    for i, task in enumerate(task_names):
        specs.append({"name": f"{task}-mlp", "task": task, "arch": "mlp", "hidden": spine})
        alt = ALTERNATES[i % len(ALTERNATES)]
        if alt == "mlp-deep":
            specs.append({"name": f"{task}-mlp-deep", "task": task, "arch": "mlp", "hidden": [spine[0], *spine]})
        else:
            specs.append({"name": f"{task}-{alt}", "task": task, "arch": alt, "hidden": spine})
    return specs


def pool_specs(dataset: str, cfg: PretrainConfig, schema: Schema) -> list[ModelSpec]:
    raw = cfg.pool.get(dataset) or default_pool(schema.task_names)
    specs = [ModelSpec.model_validate(s) for s in raw]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise EMMError(f"pretrain.pool.{dataset}: model names must be unique, got {names}")
    for s in specs:
        if s.task not in schema.task_names:
            raise EMMError(f"pretrain.pool.{dataset}: model {s.name!r} is for task {s.task!r}, but the ingested "
                           f"data has tasks {schema.task_names}")
    return specs


def train_pool_model(spec: ModelSpec, data_dir: Path, work_dir: Path, cfg: PretrainConfig, *,
                     resume: bool = False, tracking: TrackingConfig | None = None,
                     parent_run_id: str | None = None, progress: bool = True,
                     scale: ScaleConfig | None = None) -> PoolEntry:
    """Train one pool member (or reuse its finished result when resuming); returns its entry.

    Under torchrun every rank trains on its shard (``scale``: streamed or in memory) and only rank 0
    writes the work folder and logs to MLflow.
    """
    ctx = ddp.current()
    tracking = tracking if ctx.is_main else None
    schema = Schema.load(data_dir)
    work = Path(work_dir) / spec.name
    entry_file = work / "entry.json"
    signature = {"spec": spec.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
                 "fingerprint": schema.fingerprint()}
    if resume:  # rank 0 decides for everyone (the work folder may exist on its machine only)
        done = ddp.on_main(lambda: json.loads(entry_file.read_text()) if entry_file.exists() else None)
        if done is not None and done.get("signature") == signature:
            log.info("%s: already trained, reusing %s", spec.name, work)
            return PoolEntry.model_validate(done["entry"])
    if ctx.is_main:
        if not resume and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)

    rank, world = ctx.shard
    train, val, test = (open_split(data_dir, s, schema, scale, rank=rank, world=world).select_tasks([spec.task])
                        for s in ("train", "val", "test"))
    with _SEEDED_BUILD:  # seed + build as one step: concurrent pool tasks (Prefect threads) share torch's RNG
        torch.manual_seed(cfg.train.seed)  # initial weights follow the configured seed, not the RNG's history
        model = build_model(spec, schema)
    n_params = sum(p.numel() for p in model.parameters())

    def fit_and_score(on_epoch=None) -> tuple:
        trainer = Trainer(model, cfg.train, checkpoint_dir=work / "checkpoint", fingerprint=schema.fingerprint(),
                          on_epoch=on_epoch, progress=progress, desc=spec.name)
        result = trainer.fit(train, val, resume=resume)
        return result, trainer.evaluate(val)[spec.task], trainer.evaluate(test)[spec.task]

    run_id = None
    if tracking is not None:
        from emm import tracking as mt

        with mt.run(spec.name, parent_run_id=parent_run_id, tags={"emm.task": spec.task}) as run_id:
            mt.log_params({"task": spec.task, "params": n_params, **spec.model_dump(), **cfg.train.model_dump()})
            result, val_m, test_m = fit_and_score(
                lambda epoch, row: mt.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch))
            mt.log_metrics({"best_val_auc": val_m["auc"], "test_auc": test_m["auc"], "best_val_logloss": val_m["logloss"],
                            "test_logloss": test_m["logloss"], "best_epoch": result.best_epoch,
                            "epochs_run": result.epochs_run, "train_seconds": result.seconds})
            save_module(model, work / "weights.safetensors")
            if tracking.log_models:
                from emm.tracking import log_scorer, raw_example

                log_scorer("model", builder="emm.models.pool:build_from_config", config=spec.model_dump(),
                           outputs=[spec.task], weights=work / "weights.safetensors", data_dir=data_dir,
                           input_example=raw_example(data_dir))
    else:
        result, val_m, test_m = fit_and_score()
        if ctx.is_main:
            save_module(model, work / "weights.safetensors")

    entry = PoolEntry(name=spec.name, task=spec.task, spec=spec, weights=f"{spec.name}.safetensors",
                      schema_fingerprint=schema.fingerprint(), params=n_params, val_auc=val_m["auc"],
                      test_auc=test_m["auc"], val_logloss=val_m["logloss"], test_logloss=test_m["logloss"],
                      epochs_run=result.epochs_run, best_epoch=result.best_epoch, seconds=round(result.seconds, 2),
                      mlflow_run_id=run_id)
    if ctx.is_main:
        write_json(entry_file, {"signature": signature, "entry": entry.model_dump(mode="json")})
    log.info("%s: test AUC %.5f (val %.5f), %d epochs, %.0fs", spec.name, test_m["auc"], val_m["auc"],
             result.epochs_run, result.seconds)
    return entry


def assemble_pool(entries: list[PoolEntry], work_dir: Path, out_dir: Path, cfg: PretrainConfig) -> Path:
    """Write ``pool/`` atomically from the finished work folders."""
    with atomic_dir(out_dir) as tmp:
        for e in entries:
            shutil.copyfile(Path(work_dir) / e.name / "weights.safetensors", tmp / e.weights)
        write_json(tmp / POOL_FILE, {"models": [e.model_dump(mode="json") for e in entries],
                                     "provenance": provenance(params_hash(cfg))})
    return out_dir


def pretrain(dataset: str, data_dir: Path, out_dir: Path, work_dir: Path, cfg: PretrainConfig, *,
             tracking: TrackingConfig | None = None, resume: bool = False, only: list[str] | None = None,
             progress: bool = True, scale: ScaleConfig | None = None) -> list[PoolEntry]:
    """Train every pool model (sequentially) under one MLflow parent run and write ``pool/``
    (under torchrun: all ranks train, rank 0 alone tracks and writes)."""
    if not ddp.current().is_main:
        tracking = None
    schema = Schema.load(data_dir)
    specs = pool_specs(dataset, cfg, schema)
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise EMMError(f"--only names unknown pool model(s) {unknown}; the pool is {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in only]
    entries: list[PoolEntry] = []
    if tracking is None:
        entries = [train_pool_model(s, data_dir, work_dir, cfg, resume=resume, progress=progress, scale=scale)
                   for s in specs]
    else:
        from emm import tracking as mt

        mt.use_experiment(dataset, tracking.store)
        with mt.run("pool", tags={"emm.stage": "pretrain"}) as parent:
            mt.log_params({"dataset": dataset, "models": [s.name for s in specs], "rows_train": schema.rows["train"]})
            for s in specs:
                entries.append(train_pool_model(s, data_dir, work_dir, cfg, resume=resume, tracking=tracking,
                                                parent_run_id=parent, progress=progress, scale=scale))
            mt.log_metrics({f"test_auc_{e.name}": e.test_auc for e in entries})
    if ddp.current().is_main:
        assemble_pool(entries, work_dir, out_dir, cfg)
    return entries
