"""One benchmark training run = one ``Job``: plain data, so it can cross into a worker process, and a
signature, so its finished result is reused when the benchmark is run again with the same inputs.

Every job trains on the shared ``Trainer`` with early stopping on validation AUC and reports validation and
test AUC per task. Jobs that train a network also store their per-row scores beside the result json
(``<result>.test.npy``, float32, [rows, tasks]; pool, fused and LightGBM jobs also ``.val.npy``, which
the stacks are fitted on; pool models store logits rather than probabilities, which the donor ensemble
and stack are built from, a LightGBM member its margins): the report pairs them row by row for
paired bootstrap CIs. Decompose and fused jobs run on a view of the seed's pool (``members``: the whole
pool, tree members joining at the output, or its networks alone), each view in its own folders.

Why worker processes with one torch thread each: the models are small, and two single-threaded processes
train ~1.7x faster on 2 cores than one process using both (measured).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.fusion.options import DecomposeConfig
from emm.io import atomic_file, digest, inside, read_json, remove_tree, write_json
from emm.train.lightgbm_row import lightgbm_per_task
from emm.models.baselines.registry import build_baseline
from emm.models.pool import PoolEntry, member_spec
from emm.models.single_task import build_model
from emm.models.trees import LightGBMSpec, is_tree_spec, load_tree
from emm.pipeline.decompose import decompose_pool
from emm.pipeline.fuse import fuse
from emm.pipeline.params import FuseConfig, PretrainConfig
from emm.pipeline.pool_trees import member_work_file, train_lightgbm_member
from emm.pipeline.pretrain import assemble_pool, train_pool_model
from emm.runtime import set_quiet_env
from emm.train.options import TrainConfig
from emm.train.predict import predict_logits, predict_proba
from emm.train.trainer import Trainer
from emm.weights import load_module

from harness.experiments.members import view_of

log = logging.getLogger(__name__)
Kind = Literal["pool", "decompose", "baseline", "lightgbm", "fused", "recipe"]
PRIORITY = {"decompose": 0, "fused": 1, "recipe": 1, "pool": 2, "baseline": 3, "lightgbm": 4}  # critical path first
SCORED = {"pool", "baseline", "fused", "recipe", "lightgbm"}  # kinds whose per-row test scores are stored


@dataclass(frozen=True)
class Job:
    kind: Kind
    method: str                   # pool model name, baseline name, "lightgbm", an ablation, or "decompose"
    seed: int
    task_set: str                 # e.g. "income+marital"
    dataset: str
    data_dir: str
    seed_dir: str                 # <work>/<task set>/seed-<seed>/: this seed's pool, components, fused models
    config: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()   # keys of jobs that must finish first

    @property
    def key(self) -> str:
        return f"{self.task_set}/seed-{self.seed}/{self.kind}-{self.method}"

    @property
    def label(self) -> str:
        return f"{self.kind} {self.method} (seed {self.seed}, {self.task_set})"

    @property
    def result_path(self) -> Path:
        safe = self.method.replace("+", "plus-")
        return Path(self.seed_dir) / "results" / f"{self.kind}-{safe}.json"

    @property
    def work_dir(self) -> Path:
        return Path(self.seed_dir) / "work" / f"{self.kind}-{self.method.replace('+', 'plus-')}"

    def signature(self, data_fingerprint: str) -> str:
        return digest({"job": asdict(self) | {"needs": list(self.needs)}, "data": data_fingerprint})


def cached_result(job: Job, signature: str) -> dict[str, Any] | None:
    """The job's stored result when it was produced by the very same inputs, else None."""
    if not job.result_path.exists():
        return None
    stored = read_json(job.result_path)
    if stored.get("signature") != signature:
        return None
    result = stored["result"]
    if job.kind in SCORED and not _scores_present(result):  # a result from before scores were stored
        return None
    return result


def _scores_present(result: dict[str, Any]) -> bool:
    paths = result.get("scores") or {}
    return bool(paths) and all(Path(p).exists() for p in paths.values())


def save_scores(job: Job, split: str, scores: np.ndarray) -> str:
    """Write one split's per-row scores [rows, tasks] as float32 beside the job's result json."""
    path = job.result_path.with_suffix(f".{split}.npy")
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:  # a file handle: np.save would append .npy to tmp
        np.save(fh, np.asarray(scores, dtype=np.float32).reshape(len(scores), -1))
    return str(path)


def init_worker(threads: int) -> None:
    """Runs once in each worker process: bound torch's threads so parallel jobs do not fight over cores."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    set_quiet_env()
    logging.basicConfig(level=logging.WARNING)


def run_job(job: Job, signature: str) -> dict[str, Any]:
    """Run one job (resuming its own interrupted attempt when the inputs are unchanged), store its result."""
    started_file = job.result_path.with_suffix(".started")
    started_file.parent.mkdir(parents=True, exist_ok=True)
    resume = started_file.exists() and started_file.read_text() == signature
    own = Path(job.seed_dir) / "work"  # every job's folder lies here: a method name never reaches outside it
    if not resume:
        remove_tree(job.work_dir, own)
    inside(job.work_dir, own).mkdir(parents=True, exist_ok=True)
    started_file.write_text(signature)
    t0 = time.perf_counter()
    result = RUNNERS[job.kind](job, resume)
    result.update(kind=job.kind, method=job.method, seed=job.seed, task_set=job.task_set, data_dir=job.data_dir,
                  wall_seconds=round(time.perf_counter() - t0, 1))
    write_json(job.result_path, {"signature": signature, "result": result})
    started_file.unlink(missing_ok=True)
    return result


# ---- the five kinds ------------------------------------------------------------------------------------------
def _train_cfg(job: Job):
    return TrainConfig.model_validate(job.config["train"])


def _scores(val: dict, test: dict) -> dict[str, dict[str, float]]:
    return {t: {"val_auc": val[t]["auc"], "test_auc": test[t]["auc"], "test_logloss": test[t]["logloss"]} for t in test}


def _run_pool(job: Job, resume: bool) -> dict[str, Any]:
    """A pool member trained as ``emm pretrain`` trains it: a network (its weights) or a built-in LightGBM
    (its native file, read back as the frozen ``TreeModel`` the fused model runs); both store margins."""
    spec = member_spec(job.config["spec"])
    data_dir = Path(job.data_dir)
    work = job.work_dir.parent / "pool-work"
    cfg = PretrainConfig(train=_train_cfg(job))
    schema = Schema.load(data_dir)
    if isinstance(spec, LightGBMSpec):
        entry = train_lightgbm_member(spec, data_dir, work, cfg, resume=resume)
        model = load_tree(member_work_file(work / spec.name, entry), spec.format, schema, spec.name,
                          sha256=entry.weights_sha256)  # the file its AUCs were taken on
    else:
        entry = train_pool_model(spec, data_dir, work, cfg, resume=resume, progress=False)
        model = build_model(spec, schema)
        load_module(model, work / spec.name / "weights.safetensors", what=f"pool model {spec.name!r}",
                    fix="delete the benchmark's raw/ folder for this profile and run it again")
    eval_batch = _train_cfg(job).eval_batch_size
    scores = {s: save_scores(job, s, predict_logits(model, load_split(data_dir, s, schema), eval_batch))
              for s in ("val", "test")}
    return {"tasks": {entry.task: {"val_auc": entry.val_auc, "test_auc": entry.test_auc,
                                   "test_logloss": entry.test_logloss}},
            "entry": entry.model_dump(mode="json"), "params": entry.params, "epochs_run": entry.epochs_run,
            "best_epoch": entry.best_epoch, "seconds": entry.seconds,
            "member": "tree" if is_tree_spec(spec) else "network",
            "scores": scores, "score_kind": "logit", "score_tasks": [entry.task]}


def _run_decompose(job: Job, resume: bool) -> dict[str, Any]:
    seed_dir = Path(job.seed_dir)
    entries = [PoolEntry.model_validate(read_json(Path(p))["result"]["entry"]) for p in job.config["pool_results"]]
    pool_dir, components_dir = view_of(job.config).folders(seed_dir)  # this view's pool results, in its folders
    assemble_pool(entries, seed_dir / "work" / "pool-work", pool_dir, PretrainConfig(train=_train_cfg(job)))
    plan, _ = decompose_pool(Path(job.data_dir), pool_dir, components_dir,
                             DecomposeConfig.model_validate(job.config["decompose"]))
    return {"tasks": {}, "levels": plan.num_levels, "report": plan.report()}


def _run_baseline(job: Job, resume: bool) -> dict[str, Any]:
    data_dir = Path(job.data_dir)
    schema = Schema.load(data_dir)
    train, val, test = (load_split(data_dir, s, schema) for s in ("train", "val", "test"))
    torch.manual_seed(job.seed)
    model = build_baseline(job.method, schema, **job.config.get("kwargs", {}))
    trainer = Trainer(model, _train_cfg(job), checkpoint_dir=job.work_dir / "checkpoint",
                      fingerprint=schema.fingerprint(), progress=False, desc=job.method)
    fit = trainer.fit(train, val, resume=resume)
    return {"tasks": _scores(trainer.evaluate(val), trainer.evaluate(test)),
            "params": sum(p.numel() for p in model.parameters()), "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch, "seconds": round(fit.seconds, 1),
            "scores": {"test": save_scores(job, "test", trainer.predict(test))}, "score_kind": "probability",
            "score_tasks": schema.task_names}


def _run_lightgbm(job: Job, resume: bool) -> dict[str, Any]:
    started = time.perf_counter()
    out = lightgbm_per_task(Path(job.data_dir), seed=job.seed, params={"num_threads": job.config.get("threads", 1)})
    tasks = list(out)
    scores = {s: save_scores(job, s, np.stack([out[t][f"{s}_scores"] for t in tasks], axis=1)) for s in ("val", "test")}
    return {"tasks": {t: {"val_auc": r["val_auc"], "test_auc": r["test_auc"]} for t, r in out.items()},
            "best_iteration": {t: r["best_iteration"] for t, r in out.items()},
            "seconds": round(time.perf_counter() - started, 1),
            "scores": scores, "score_kind": "probability", "score_tasks": tasks}


def _run_fused(job: Job, resume: bool) -> dict[str, Any]:
    seed_dir = Path(job.seed_dir)
    cfg = FuseConfig.model_validate(job.config["fuse"])
    pool_dir, components_dir = view_of(job.config).folders(seed_dir)
    res = fuse(job.dataset, Path(job.data_dir), pool_dir, components_dir, job.work_dir / "fused",
               job.work_dir / "train", cfg, DecomposeConfig.model_validate(job.config["decompose"]),
               resume=resume, progress=False)
    schema = Schema.load(Path(job.data_dir))
    scores = {s: save_scores(job, s, predict_proba(res.model, load_split(Path(job.data_dir), s, schema),
                                                  cfg.train.eval_batch_size))  # as fuse's own AUCs were computed
              for s in ("val", "test")}
    return {"tasks": _scores(res.val, res.test), "gates": res.model.gate_report(),
            "params": sum(p.numel() for p in res.model.parameters() if p.requires_grad),
            "epochs_run": res.fit.epochs_run, "best_epoch": res.fit.best_epoch, "seconds": round(res.fit.seconds, 1),
            "scores": scores, "score_kind": "probability", "score_tasks": schema.task_names}


RUNNERS = {"pool": _run_pool, "decompose": _run_decompose, "baseline": _run_baseline, "lightgbm": _run_lightgbm,
           "fused": _run_fused, "recipe": _run_fused}  # a recipe is a fused model with other fuse settings


def describe(result: dict[str, Any]) -> str:
    aucs = ", ".join(f"{t} {m['test_auc']:.5f}" for t, m in result.get("tasks", {}).items())
    return aucs or json.dumps({k: result[k] for k in ("levels",) if k in result})
