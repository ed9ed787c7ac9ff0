"""Stage 7, ``compress``: the fused model distilled into one small multi-task network, registered as ``@fast``
when it scores within ``compress.max_auc_loss`` of the fused model on every task.

The model and its training are the library's (``emm.train.compact``: a Shared-Bottom sized by a FLOPs
budget, trained on the fused model's probabilities over every training row); this stage scores it against
the fused model, writes ``compact/`` and registers it.

The comparison is paired: both models score the same test rows, each task on its labelled rows, and the
difference compact − fused gets evaluate's paired bootstrap CI (same resamples, confidence and seed).

The gate (``gate``): registered only when, on every task, the point estimate of compact − fused is at least
``-max_auc_loss``. Why the point estimate and not the CI's lower end: the lower end above the bound would
ask the test set to *prove* the loss is that small, and the paired CI of two close models is several times
wider than a bound of a few ten-thousandths on test sets of Census's size, so no compact model could pass
however faithful it is. The point estimate is the best single reading of the loss; the CI is recorded
beside it, with whether its lower end clears the bound as well (``ci_within``), for the reader to judge.
A compact model that fails the gate is not an error: the stage says why (here and in compact.json), exits
normally, and the fused model stays the only one to serve.

Registered (``register_compact``): a new version of ``emm-<dataset>`` logged from its own MLflow run (not
the fuse run: ``emm export`` matches versions to ``fused/`` by run), tagged ``compact=true`` with its cost,
its AUCs and compact − fused, aliased ``fast``; ``challenger`` and ``champion`` are left where they are
(``emm promote`` refuses a compact version). The same compact weights compressed again reuse their version.

On disk: ``artifacts/<dataset>/compact/`` (atomic): ``compact.safetensors``, ``compact.onnx`` (exported and
checked against torch as ``emm export`` does the fused model) and ``compact.json`` (spec, cost, AUCs, the
CIs, the verdict and what it was made from).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split
from emm.errors import EMMError
from emm.fusion.saved import FUSED_JSON, FUSED_WEIGHTS, load_fused
from emm.io import atomic_dir, digest, provenance, read_json, sha256_file, write_json
from emm.models.pool import load_pool
from emm.pipeline.evaluate import CI_CONFIDENCE, CI_RESAMPLES, CI_SEED, task_masks
from emm.pipeline.export import check_rows_of, export_checked
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import CompressConfig, TrackingConfig, load_params
from emm.tracking import registry
from emm.tracking.pyfunc import COMPACT_MODEL_BUILDER
from emm.tracking.runs import open_run
from emm.tracking.store import configure, registered_name
from emm.train.compact import (COST_ROWS, WIDTH_STEP, CompactResult, CompactSpec, build_compact, shared_embedding,
                               train_compact)
from emm.train.compare import paired_auc_cis
from emm.train.cost import model_cost
from emm.train.metrics import check_scores, mean_auc, task_metrics
from emm.train.predict import predict_proba
from emm.weights import save_module

log = logging.getLogger(__name__)
COMPACT_JSON, COMPACT_WEIGHTS, COMPACT_ONNX = "compact.json", "compact.safetensors", "compact.onnx"
CI_KEY = "compact_minus_fused"


def compare_with_fused(compact: np.ndarray, fused: np.ndarray, test: SplitTensors,
                       masks: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Per task, on its labelled test rows: both AUCs and compact − fused with its paired bootstrap CI."""
    out = {}
    for i, task in enumerate(test.task_names):
        m = masks[task]["test"]
        ci = paired_auc_cis(test.labels[:, i].numpy()[m], {CI_KEY: [(compact[m, i], fused[m, i])]},
                            n_resamples=CI_RESAMPLES, confidence=CI_CONFIDENCE, seed=CI_SEED)[CI_KEY]
        out[task] = {"compact_auc": ci["auc_a"], "fused_auc": ci["auc_b"], "diff": ci["diff"], "low": ci["low"],
                     "high": ci["high"], "confidence": ci["confidence"], "labelled_test_rows": int(m.sum())}
    return out


def gate(per_task: dict[str, dict[str, Any]], max_auc_loss: float) -> tuple[bool, list[str]]:
    """(within, reasons): within when compact − fused is at least ``-max_auc_loss`` on every task (the point
    estimate: see the module docstring); a reason per task that is not. Also marks each task's
    ``within`` and ``ci_within`` (the CI's lower end clears the bound too) in ``per_task``."""
    reasons = []
    for task, row in per_task.items():
        row["within"] = bool(row["diff"] >= -max_auc_loss)
        row["ci_within"] = bool(row["low"] >= -max_auc_loss)
        if not row["within"]:
            reasons.append(f"{task}: compact − fused {row['diff']:+.5f} (95% CI [{row['low']:+.5f}, "
                           f"{row['high']:+.5f}]) is below −{max_auc_loss:g}")
    return not reasons, reasons


def fused_version(eval_dir: Path) -> str | None:
    """The registry version evaluate registered the fused model as (None when it registered none)."""
    metrics = Path(eval_dir) / "metrics.json"
    return read_json(metrics).get("registered_version") if metrics.is_file() else None


def compress(dataset: str, data_dir: Path, pool_dir: Path, fused_dir: Path, eval_dir: Path, out_dir: Path,
             cfg: CompressConfig, *, tracking: TrackingConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """Distil ``fused/`` into a compact model, compare them on the test rows, write ``compact/``; with
    ``tracking`` and within the bound, register it (``register_compact``, inside the atomic folder as
    evaluate does: compact.json never names a registration that did not happen). Returns compact.json."""
    if not (Path(fused_dir) / FUSED_JSON).is_file():
        raise EMMError(f"no fused model in {fused_dir}: run `emm fuse {dataset}` (and `emm evaluate`) first")
    schema = Schema.load(data_dir)
    record: dict[str, Any] = {
        "dataset": dataset, "tasks": schema.task_names, "enabled": cfg.enabled,
        "schema_fingerprint": schema.fingerprint(),
        "made_from": {"fused_sha256": sha256_file(Path(fused_dir) / FUSED_WEIGHTS),
                      "fused_version": fused_version(eval_dir), "compress": digest(cfg)}}
    if not cfg.enabled:
        record["note"] = "compress.enabled is false: no compact model was made; the fused model is the one to serve"
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / COMPACT_JSON, record)
        return record
    teacher, _ = load_fused(fused_dir, schema)
    train, val, test = (load_split(data_dir, s, schema) for s in ("train", "val", "test"))
    masks = task_masks(schema, val, test)
    member, start_from = warm_start_member(pool_dir, fused_dir, schema, cfg)
    result = train_compact(teacher, schema, train, val, cfg, start_from=start_from, progress=progress, on_spec=lambda spec, cost: log.info(
        "compact model: bottom %s, tower %s: %s FLOPs per row (budget %s)", spec.bottom, spec.tower,
        f"{cost.flops_per_row:,}", f"{cfg.flops_per_row:,}"))
    compact = check_scores(predict_proba(result.model, test), what="the compact model")
    fused = predict_proba(teacher, test)
    per_task = compare_with_fused(compact, fused, test, masks)
    within, reasons = gate(per_task, cfg.max_auc_loss)
    record.update(describe(result, teacher, val, cfg), tasks_compared=per_task,
                  warm_start={"member": member, "copied": result.warm_started}, max_auc_loss=cfg.max_auc_loss,
                  within=within, reasons=reasons,
                  mean_test_auc=float(np.mean([r["compact_auc"] for r in per_task.values()])))
    with atomic_dir(out_dir) as tmp:
        save_module(result.model, tmp / COMPACT_WEIGHTS)
        record["onnx"] = export_checked(result.model, schema, check_rows_of(data_dir, schema), tmp / COMPACT_ONNX,
                                        dataset=dataset, tasks=schema.task_names, what="compact model")
        record["provenance"] = provenance(digest(cfg), schema.fingerprint())
        write_json(tmp / COMPACT_JSON, record)
        if within and tracking is not None:
            record.update(register_compact(dataset, data_dir, tmp, record, tracking))
            write_json(tmp / COMPACT_JSON, record)
    return record


def warm_start_member(pool_dir: Path, fused_dir: Path, schema: Schema, cfg: CompressConfig) -> tuple[str | None, Any]:
    """(name, module) of the pool member the compact model starts from (``compress.warm_start``), or (None, None).

    ``auto``: the members of the hardest task (the lowest validation AUC of the fused model, fused.json), in pool
    order, the first whose embedding the compact model shares (``emm.train.compact.shared_embedding``). Why the
    hardest task: the easy ones come within the bound from any start; the hardest one decides whether the compact
    model is registered. A named member that is not in the pool, or whose
    embedding the compact model does not share, is an ``EMMError``."""
    if cfg.warm_start == "none":
        return None, None
    members = {entry.name: (entry, module) for entry, module in load_pool(pool_dir, schema)}
    narrowest = build_compact(CompactSpec(bottom=[WIDTH_STEP], tower=list(cfg.tower), embed_dim=cfg.embed_dim,
                                          numeric=cfg.numeric), schema)  # its embedding is every width's

    def shares_embedding(module: Any) -> bool:
        return bool(shared_embedding(narrowest, module))

    if cfg.warm_start != "auto":
        if cfg.warm_start not in members:
            raise EMMError(f"compress.warm_start names {cfg.warm_start!r}, which is not in the pool ({pool_dir}: "
                           f"{', '.join(members)}): name one of them, or use auto or none")
        if not shares_embedding(members[cfg.warm_start][1]):
            raise EMMError(f"compress.warm_start: pool member {cfg.warm_start!r} does not have the compact model's "
                           f"embedding (compress.embed_dim {cfg.embed_dim}, numeric {cfg.numeric.mode}): name a "
                           "member that does, or use auto or none")
        return cfg.warm_start, members[cfg.warm_start][1]
    val_auc = read_json(Path(fused_dir) / FUSED_JSON).get("val", {})
    tasks = sorted(schema.task_names, key=lambda t: val_auc.get(t, {}).get("auc", 1.0))
    for task in tasks:
        for name, (entry, module) in members.items():
            if entry.task == task and shares_embedding(module):
                log.info("compact model: starts from pool member %s (task %s, the hardest first)", name, task)
                return name, module
    log.info("compact model: no pool member shares its embedding; it starts from random weights")
    return None, None


def describe(result: CompactResult, teacher: Any, val: SplitTensors, cfg: CompressConfig) -> dict[str, Any]:
    """compact.json's account of the model: its spec, cost (and the fused model's, counted alike), training
    and validation AUCs."""
    rows = val.head(COST_ROWS)
    val_metrics = task_metrics(val.labels.numpy(), predict_proba(result.model, val), val.task_names,
                               what="the compact model")
    return {"spec": result.spec.model_dump(mode="json"), "budget_flops_per_row": cfg.flops_per_row,
            "cost": result.cost.as_dict(), "fused_cost": model_cost(teacher, rows.sparse, rows.dense).as_dict(),
            "fit": {"best_epoch": result.fit.best_epoch, "epochs_run": result.fit.epochs_run,
                    "seconds": round(result.fit.seconds, 1)},
            "val": {t: m["auc"] for t, m in val_metrics.items()}, "mean_val_auc": mean_auc(val_metrics),
            "history": result.fit.history}


def compact_tags(record: dict[str, Any], weights_sha256: str) -> dict[str, str]:
    """The registered compact version's tags: what it is, what it costs, how it scores against the fused model."""
    tags = {registry.COMPACT_TAG: "true", registry.COMPACT_DIGEST_TAG: weights_sha256,
            registry.SCORE_TAG: f"{record['mean_test_auc']:.6f}", "flops_per_row": str(record["cost"]["flops_per_row"]),
            "parameters": str(record["cost"]["parameters"]),
            "made_from_fused_sha256": record["made_from"]["fused_sha256"],
            "made_from_fused_version": str(record["made_from"]["fused_version"] or "")}
    for task, r in record["tasks_compared"].items():
        tags.update({f"test_auc_{task}": f"{r['compact_auc']:.6f}", f"{CI_KEY}_{task}": f"{r['diff']:.6f}",
                     f"{CI_KEY}_{task}_ci_low": f"{r['low']:.6f}", f"{CI_KEY}_{task}_ci_high": f"{r['high']:.6f}"})
    return tags


def register_compact(dataset: str, data_dir: Path, compact_dir: Path, record: dict[str, Any],
                     tracking: TrackingConfig) -> dict[str, Any]:
    """Register the compact model in ``compact_dir`` as a version of emm-<dataset> aliased ``fast``, from a run of
    its own (its params, metrics, compact.json and the ONNX file); a version registered from the same compact
    weights (``compact_sha256``) is reused instead, and ``fast`` moved back to it. Returns the registration
    fields of compact.json."""
    name = registered_name(dataset)
    weights = Path(compact_dir) / COMPACT_WEIGHTS
    sha = sha256_file(weights)
    configure(tracking.store)
    with registry.registration_lock(name, tracking.store):
        existing = registry.version_with_tag(name, registry.COMPACT_DIGEST_TAG, sha)
        if existing is not None:
            registry.set_alias(name, registry.FAST, str(existing.version))
            log.info("%s version %s was registered from these compact weights already: reused it, alias %s",
                     name, existing.version, registry.FAST)
            return {"registered_name": name, "registered_version": str(existing.version), "registered_reused": True,
                    "mlflow_run_id": existing.run_id}
        with open_run(dataset, tracking.store, "compact", tags={"emm.stage": "compress"},
                      log_models=tracking.log_models) as tracker:
            tracker.log_params({"budget_flops_per_row": record["budget_flops_per_row"], **record["spec"],
                                "max_auc_loss": record["max_auc_loss"]})
            tracker.log_metrics({"flops_per_row": record["cost"]["flops_per_row"],
                                 "mean_test_auc": record["mean_test_auc"],
                                 **{f"test_auc_{t}": r["compact_auc"] for t, r in record["tasks_compared"].items()},
                                 **{f"{CI_KEY}_{t}": r["diff"] for t, r in record["tasks_compared"].items()}})
            tracker.log_artifact(Path(compact_dir) / COMPACT_JSON, "compact")
            tracker.log_artifact(Path(compact_dir) / COMPACT_ONNX, "export")
            version = tracker.log_model("model", builder=COMPACT_MODEL_BUILDER, config=record["spec"],
                                        outputs=record["tasks"], weights=weights, data_dir=data_dir,
                                        registered_name=name)
            assert version is not None  # a registered_name always yields a version
            registry.tag_version(name, version, compact_tags(record, sha), alias=registry.FAST)
            run_id = tracker.run_id
    log.info("registered %s version %s as %s", name, version, registry.FAST)
    return {"registered_name": name, "registered_version": version, "registered_reused": False, "mlflow_run_id": run_id}


def summary_lines(record: dict[str, Any]) -> list[str]:
    """What ``emm compress`` prints (and the flow's report shows): the model, each task's compact − fused
    with its CI, and whether it was registered, or why not."""
    if not record.get("enabled", True):
        return [record["note"]]
    spec, cost, fused = record["spec"], record["cost"], record["fused_cost"]
    lines = [f"compact model: bottom {spec['bottom']}, towers {spec['tower']}, embedding {spec['embed_dim']} "
             f"({spec['numeric']['mode']} dense): {cost['flops_per_row']:,} FLOPs per row (budget "
             f"{record['budget_flops_per_row']:,}; the fused model {fused['flops_per_row']:,}), "
             f"{cost['parameters']:,} parameters (fused {fused['parameters']:,})"]
    for task, r in record["tasks_compared"].items():
        lines.append(f"{task}: compact {r['compact_auc']:.5f} vs fused {r['fused_auc']:.5f}: {r['diff']:+.5f}, "
                     f"{r['confidence']:.0%} CI [{r['low']:+.5f}, {r['high']:+.5f}] on {r['labelled_test_rows']:,} "
                     f"labelled test rows: {'within' if r['within'] else 'NOT within'} {record['max_auc_loss']:g}")
    if not record["within"]:
        lines.append("not registered: " + "; ".join(record["reasons"]) + ". The fused model stays the one to serve; "
                     "a larger compress.flops_per_row may close the gap")
    elif record.get("registered_version"):
        how = "reused (same compact weights)" if record.get("registered_reused") else "registered"
        lines.append(f"{how} version {record['registered_version']} (alias fast): serve it as "
                     f"models:/{record['registered_name']}@fast")
    else:
        lines.append("within the bound; not registered (--no-register)")
    return lines


def compress_stage(dataset: str, params: Path | str | None = None, *, register: bool = True,
                   progress: bool = False) -> dict[str, Any]:
    """Compress ``fused/`` into ``compact/``; register it as ``emm-<dataset>`` @fast when within the bound
    (unless ``register`` is off)."""
    cfg = load_params(params)
    dirs = [stage_dir(cfg, dataset, s) for s in ("data", "pool", "fused", "eval", "compact")]
    return compress(dataset, *dirs, cfg.compress, tracking=cfg.tracking if register else None, progress=progress)
