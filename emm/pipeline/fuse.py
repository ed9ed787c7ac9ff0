"""Stage 4, ``fuse``: build the AKF model on the saved components, train it, write ``fused/``.

The procedure is the library's (``emm.fusion.procedure``): ``FusePlan.from_options`` reads the ``fuse`` settings
into phases (components frozen, then optionally a fine-tune) and a target (labels or distillation), and
``FuseRunner`` executes it; this stage hands it the pool, the rows, the checkpoint folder and the tracker.

What lands in ``fused/`` is described in ``emm.fusion.saved`` (the one loader); this stage adds the
training record (fit, val/test metrics, gates, the MLflow run) to ``fused.json``. The model saved is the trained
one pruned (``emm.fusion.prune``): what adds exactly nothing to a score (a residual early stopping kept at zero,
a donor no blend weighs) is left out, the architecture records what and why, and ``cost`` records FLOPs per row
and parameters before and after, counted on the same validation rows (``emm.train.cost``).

``--resume`` continues ``fused-work/checkpoint`` (and a fine-tune phase's ``checkpoint-finetune``) only when it
was made from the same fuse and decompose settings and the same pool and components (``fuse_made_from``): the
checkpoint holds the frozen components too, so resuming one from an older pool would bring the old pool back
into ``fused/``.

For the same reason the pool is checked and loaded (``load_pool_plan``: digests, signatures, finite
weights), components cut from another pool are refused, and ``fused.json`` records the pool it was fused
from (``made_from``, ``fused_pool``: the networks and the tree members), for evaluate to refuse a fused model
that another pool left behind.

Tree members (LightGBM, XGBoost) are not in the components: they are loaded from ``pool/`` here
(``load_output_members``) and join the fused model's blend as donors (``emm.fusion.blend.OutputMember``); their
native files are copied into ``fused/`` beside the weights (``emm.fusion.saved.save_output_files``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from emm.data.options import ScaleConfig
from emm.data.schema import Schema
from emm.data.stream import open_split
from emm.errors import EMMError
from emm.fusion.blend import OutputMember
from emm.fusion.fused import FusedModel
from emm.fusion.options import DecomposeConfig
from emm.fusion.procedure import FusePlan, FuseRunner
from emm.fusion.prune import cost_record, prune
from emm.fusion.saved import FUSED_JSON, FUSED_WEIGHTS, architecture, save_output_files
from emm.io import atomic_dir, digest, provenance, read_json, tree_digest, write_json
from emm.models.pool import PoolEntry, load_tree_member, read_pool
from emm.pipeline.decompose import fused_pool, load_pool_plan, output_order, stage_pool_signatures
from emm.pipeline.layout import stage_dir, stage_tracker
from emm.pipeline.params import FuseConfig, load_params
from emm.tracker import NullTracker, Tracker
from emm.train import distributed as ddp
from emm.train.metrics import mean_auc
from emm.train.trainer import FitResult
from emm.weights import save_module

log = logging.getLogger(__name__)
STACK_ROWS = 1_000_000  # validation rows the donor stack is fitted on (all of them on Census-size data)
COST_ROWS = 1024  # validation rows the FLOPs per row are counted on


@dataclass
class FuseResult:
    model: FusedModel  # as trained (its scores are ``val``/``test``)
    fit: FitResult
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]]
    run_id: str | None
    saved: FusedModel | None = None  # what ``fused/`` holds: ``model`` pruned (the rank that writes only)


def load_output_members(pool_dir: Path, schema: Schema, expected: dict[str, dict] | None = None
                        ) -> tuple[list[PoolEntry], list[OutputMember]]:
    """The whole pool's entries (checked, ``read_pool``) and its tree members, each loaded from its native file in
    ``pool_dir`` (its sha256 checked as it is read), in pool order: the donors that join at the output."""
    entries = read_pool(pool_dir, expected)
    members = [OutputMember(e.name, e.task, load_tree_member(e, pool_dir, schema), e.weights, str(e.weights_sha256))
               for e in (entries[i] for i in output_order(entries))]
    return entries, members


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
    everything, outputs = load_output_members(pool_dir, schema, expected)
    pool = fused_pool(everything)
    tasks_without_models = [t for t in schema.task_names if t not in {e.task for e in entries}]
    if tasks_without_models:
        raise EMMError(f"task(s) {tasks_without_models} have no model in the pool {[e.name for e in entries]}; "
                       f"add one to pretrain.pool.{dataset} and pretrain again")
    runner = FuseRunner(FusePlan.from_options(cfg), plan, [e.task for e in entries], schema,
                        work_dir=Path(work_dir), made_from=fuse_made_from(pool, components_dir, cfg, dcfg),
                        tracker=tracker, progress=progress, desc=f"fused[{cfg.ablation}]", outputs=outputs)
    model = runner.model
    # every rank fits on the same (whole) val rows
    blend = runner.prepare(lambda: open_split(data_dir, "val", schema, scale).head(STACK_ROWS))
    rank, world = ctx.shard
    train, val, test = (open_split(data_dir, s, schema, scale, rank=rank, world=world) for s in ("train", "val", "test"))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tracker.log_params({**cfg.akf.model_dump(), "levels": plan.num_levels,
                        "pool": [e.name for e in entries] + [m.name for m in outputs],
                        "trainable_params": n_trainable, "distill": cfg.distill, **cfg.train.model_dump()})
    fitted = runner.train(train, val, resume=resume)
    fit = fitted.fit
    val_m, test_m = runner.evaluate(val), runner.evaluate(test)
    tracker.log_metrics({**{f"test_auc_{t}": m["auc"] for t, m in test_m.items()},
                         **{f"best_val_auc_{t}": m["auc"] for t, m in val_m.items()},
                         "mean_test_auc": mean_auc(test_m), "epochs_run": fit.epochs_run})
    if not ctx.is_main:
        return FuseResult(model, fit, val_m, test_m, tracker.run_id)
    saved = prune(model)
    probe = val.head(COST_ROWS)
    cost = cost_record(model, saved, probe.sparse, probe.dense)
    log.info("saved model: %s FLOPs per row, %s parameters (as trained: %s, %s); pruned: %s",
             f"{cost['saved']['flops_per_row']:,}", f"{cost['saved']['parameters']:,}",
             f"{cost['unpruned']['flops_per_row']:,}", f"{cost['unpruned']['parameters']:,}",
             saved.pruning.config(saved.task_names) if not saved.pruning.empty else "nothing")
    with atomic_dir(out_dir) as tmp:
        save_module(saved, tmp / FUSED_WEIGHTS)
        save_output_files(saved, pool_dir, tmp)
        write_json(tmp / FUSED_JSON, {
            "dataset": dataset, "tasks": schema.task_names, "schema_fingerprint": schema.fingerprint(),
            "architecture": architecture([e.spec for e in entries], dcfg, saved), "trainable_params": n_trainable,
            "total_params": sum(p.numel() for p in model.parameters()), "cost": cost,
            "fit": {"best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run, "seconds": round(fit.seconds, 1),
                    "kept_start": fitted.kept_start},
            "val": val_m, "test": test_m, "mlflow_run_id": tracker.run_id, "gates": model.gate_report(),
            "blend_init": blend, "history": fit.history, "finetune": fitted.record("finetune"), "distill": cfg.distill,
            "made_from": {"pool": pool},
            "provenance": provenance(digest(cfg)),
        })
    log.info("fused model: test %s", {t: round(m["auc"], 5) for t, m in test_m.items()})
    return FuseResult(model, fit, val_m, test_m, tracker.run_id, saved)


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
