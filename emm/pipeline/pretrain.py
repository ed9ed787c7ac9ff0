"""Stage 2, ``pretrain``: train the single-task model pool, track it, write ``pool/``.

Each model trains in its own work folder (``<artifacts>/<dataset>/pool-work/<name>/``) that holds its
per-epoch checkpoint and, once done, its weights and entry. So ``--resume`` after a kill skips finished
models and continues the interrupted one from its last epoch; and Prefect can train pool members as
concurrent tasks (``pretrain_model_stage``). ``pool/`` itself is assembled atomically at the end.

What makes a trained result reusable is its *signature* (the spec, the train settings, the data schema),
kept beside it in ``entry.json`` and, per member, in ``pool.json``. The per-epoch checkpoint records the
same inputs (``Trainer(made_from=...)``, max_epochs aside), so a changed setting trains fresh instead of
continuing old work. ``--only NAME`` retrains some members and takes the others' results as they are,
from their work folders or the current ``pool/``, when their signatures still match.

A member trains, early-stops and is scored on the rows labelled for its task (``task_rows``; a scarce
task's label may be missing on most rows): its AUCs are those of its task's labelled rows, and the counts
it saw go into its ``entry.json``, its run's params and pool.json (``labelled_rows``).

Before ``pool/`` is written its members are screened (``screen_members``): one no better than chance is
warned about, and ``pretrain.min_val_auc`` refuses those below it.

Pool entries may also come from outside (``uri:`` an MLflow model, ``factory:`` your builder + weights; see
``emm.models.external``): those are imported, checked and scored by ``emm.pipeline.pool_import`` into the
same work folders and the same ``pool.json`` records, never trained. Tree members (``arch: lightgbm``,
trained here; ``lightgbm:`` / ``xgboost:`` files, imported) go through ``emm.pipeline.pool_trees``. Each
built-in network member is also registered as a version of ``emm-<dataset>-<task>`` (when models are
logged), so the MLflow registry lists what can be fused and a later pool can name one by alias.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import torch

from emm.data.options import ScaleConfig
from emm.data.schema import Schema
from emm.data.stream import open_split
from emm.errors import EMMError
from emm.io import atomic_dir, digest, inside, provenance, read_json, remove_tree, sha256_file, write_json
from emm.models.external import Member, source_of
from emm.models.pool import POOL_FILE, PoolEntry, check_entry, check_weights, read_pool
from emm.models.single_task import ModelSpec, build_model
from emm.models.trees import LightGBMSpec, TreeFileMember
from emm.pipeline.layout import stage_dir, stage_tracker
from emm.pipeline.params import PretrainConfig, load_params
from emm.pipeline.pool_import import import_member, import_signature, task_rows
from emm.pipeline.pool_specs import pool_specs
from emm.pipeline.pool_trees import import_tree_member, lightgbm_signature, member_work_file, train_lightgbm_member
from emm.tracker import NullTracker, Tracker
from emm.train import distributed as ddp
from emm.train.trainer import Trainer
from emm.weights import save_module

log = logging.getLogger(__name__)
POOL_MODEL_BUILDER = "emm.models.pool:build_from_config"
CHANCE_AUC = 0.5  # a constant predictor's AUC: a member at or below it has learned nothing
_SEEDED_BUILD = threading.Lock()


def member_key(member: Member, cfg: PretrainConfig, fingerprint: str) -> dict:
    """The signature of a member's result: trained (built-in) or imported (outside) from what it is now."""
    if isinstance(member, ModelSpec):
        return member_signature(member, cfg, fingerprint)
    if isinstance(member, LightGBMSpec):
        return lightgbm_signature(member, cfg, fingerprint)
    return import_signature(member, fingerprint)


def pool_signatures(dataset: str, cfg: PretrainConfig, schema: Schema) -> dict[str, dict]:
    """Member name -> the signature pool.json must record for it under the current params and data, in pool
    order: what every stage reading ``pool/`` checks it against (``emm.models.pool.check_pool``)."""
    return {m.name: member_key(m, cfg, schema.fingerprint()) for m in pool_specs(dataset, cfg, schema)}


def train_pool_model(spec: ModelSpec, data_dir: Path, work_dir: Path, cfg: PretrainConfig, *,
                     resume: bool = False, tracker: Tracker | None = None, progress: bool = True,
                     scale: ScaleConfig | None = None) -> PoolEntry:
    """Train one pool member (or reuse its finished result when resuming); returns its entry.

    Under torchrun every rank trains on its shard (``scale``: streamed or in memory) and only rank 0
    writes the work folder (and is handed a real tracker). With models logged, the trained member is
    registered as a new version of ``emm-<dataset>-<task>`` (``register_member``).
    """
    ctx = ddp.current()
    tracker = tracker or NullTracker()
    schema = Schema.load(data_dir)
    work = Path(work_dir) / spec.name
    entry_file = work / "entry.json"
    signature = member_signature(spec, cfg, schema.fingerprint())
    if resume:  # rank 0 decides for everyone (the work folder may exist on its machine only)
        done = ddp.on_main(lambda: read_json(entry_file) if entry_file.exists() else None)
        if done is not None and done.get("signature") == signature:
            log.info("%s: already trained, reusing %s", spec.name, work)
            return PoolEntry.model_validate(done["entry"])
    if ctx.is_main:
        if not resume:
            remove_tree(work, work_dir)  # a guard, though names are checked at parse time: never outside pool-work/
        inside(work, work_dir).mkdir(parents=True, exist_ok=True)

    rank, world = ctx.shard
    what = f"pool model {spec.name!r}"
    train, val, test = (task_rows(open_split(data_dir, s, schema, scale, rank=rank, world=world), spec.task, s,
                                  schema, what) for s in ("train", "val", "test"))
    # rows over all ranks (each holds its shard) that the member trains, early-stops and is scored on
    labelled = {s: sum(ddp.all_gather_ints(len(d))) for s, d in (("train", train), ("val", val), ("test", test))}
    with _SEEDED_BUILD:  # seed + build as one step: concurrent pool tasks (Prefect threads) share torch's RNG
        torch.manual_seed(cfg.train.seed)  # initial weights follow the configured seed, not the RNG's history
        model = build_model(spec, schema)
    n_params = sum(p.numel() for p in model.parameters())
    tracker.log_params({"task": spec.task, "params": n_params, **spec.model_dump(), **cfg.train.model_dump(),
                        **{f"labelled_rows_{s}": n for s, n in labelled.items()}})
    trainer = Trainer(model, cfg.train, checkpoint_dir=work / "checkpoint", fingerprint=schema.fingerprint(),
                      made_from={"spec": signature["spec"]}, tracker=tracker, progress=progress, desc=spec.name)
    result = trainer.fit(train, val, resume=resume)
    val_m, test_m = trainer.evaluate(val)[spec.task], trainer.evaluate(test)[spec.task]
    tracker.log_metrics({"best_val_auc": val_m["auc"], "test_auc": test_m["auc"], "best_val_logloss": val_m["logloss"],
                         "test_logloss": test_m["logloss"], "best_epoch": result.best_epoch,
                         "epochs_run": result.epochs_run, "train_seconds": result.seconds})
    entry = PoolEntry(name=spec.name, task=spec.task, spec=spec, weights=f"{spec.name}.safetensors",
                      schema_fingerprint=schema.fingerprint(), params=n_params, val_auc=val_m["auc"],
                      test_auc=test_m["auc"], val_logloss=val_m["logloss"], test_logloss=test_m["logloss"],
                      epochs_run=result.epochs_run, best_epoch=result.best_epoch, seconds=round(result.seconds, 2),
                      mlflow_run_id=tracker.run_id)
    if ctx.is_main:
        save_module(model, work / "weights.safetensors")
        register_member(entry, tracker, work / "weights.safetensors", data_dir, schema)
        write_json(entry_file, {"signature": signature, "entry": entry.model_dump(mode="json"), "labelled": labelled})
    log.info("%s: test AUC %.5f (val %.5f), %d epochs, %.0fs; trained on %d labelled %s rows", spec.name,
             test_m["auc"], val_m["auc"], result.epochs_run, result.seconds, labelled["train"], spec.task)
    return entry


def task_model_name(dataset: str, task: str) -> str:
    """The registered model a task's built-in pool members are versions of."""
    return f"emm-{dataset}-{task}"


def register_member(entry: PoolEntry, tracker: Tracker, weights: Path, data_dir: Path, schema: Schema) -> None:
    """Log the member's scorer into its run and, when the tracker logs models, register it as a version of
    ``emm-<dataset>-<task>`` tagged with its name, AUCs and schema fingerprint (a plain log otherwise)."""
    dataset = getattr(tracker, "dataset", None)
    register = bool(getattr(tracker, "log_models", False)) and dataset is not None
    name = task_model_name(dataset, entry.task) if register else None
    version = tracker.log_model("model", builder=POOL_MODEL_BUILDER, config=entry.spec.model_dump(),
                                outputs=[entry.task], weights=weights, data_dir=data_dir, registered_name=name)
    if name and version:
        from emm.tracking.external import tag_member_version  # local: an untracked pretrain never imports mlflow

        tag_member_version(name, version, {"emm.member": entry.name, "val_auc": f"{entry.val_auc:.6f}",
                                           "test_auc": f"{entry.test_auc:.6f}", "emm.schema_fingerprint":
                                           schema.fingerprint(), "arch": getattr(entry.spec, "arch", "")})
        log.info("%s: registered as %s version %s", entry.name, name, version)


def member_signature(spec: ModelSpec, cfg: PretrainConfig, fingerprint: str) -> dict:
    """What a pool member's trained result was made from: equal signatures, interchangeable results."""
    return {"spec": spec.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json"),
            "fingerprint": fingerprint}


def finished_member(spec: Member, cfg: PretrainConfig, fingerprint: str, work_dir: Path,
                    pool_dir: Path) -> tuple[PoolEntry, Path] | None:
    """A finished result of ``spec`` under the current settings, with its weights file: from its work
    folder, else from the current ``pool/``; None when neither has one whose signature matches."""
    signature = member_key(spec, cfg, fingerprint)
    work = Path(work_dir) / spec.name
    if (work / "entry.json").is_file() and member_work_file(work, spec).is_file():
        done = read_json(work / "entry.json")
        if done.get("signature") == signature:
            return PoolEntry.model_validate(done["entry"]), member_work_file(work, spec)
    pool_file = Path(pool_dir) / POOL_FILE
    if pool_file.is_file():
        pool = read_json(pool_file)
        if (pool.get("signatures") or {}).get(spec.name) == signature:
            for raw in pool.get("models", []):
                if raw.get("name") == spec.name and (Path(pool_dir) / raw["weights"]).is_file():
                    entry = PoolEntry.model_validate(raw)
                    # checked as every stage checks pool/: a swapped or edited file would otherwise be
                    # carried into the new pool.json under a fresh digest
                    check_entry(pool_file, entry, signature)
                    check_weights(pool_dir, entry)
                    return entry, Path(pool_dir) / entry.weights
    return None


def screen_members(entries: list[PoolEntry], cfg: PretrainConfig, out_dir: Path) -> None:
    """Warn about members no better than chance; refuse those below ``pretrain.min_val_auc``.

    Why: a degenerate member (a constant predictor, a NaN AUC) lowers the pool's mean AUC, which is what
    the fused model's Gain is measured against, so it would flatter EMM without anyone noticing.
    """
    for e in entries:
        if not e.val_auc > CHANCE_AUC:
            log.warning("pool model %r has val AUC %s: no better than chance (a constant or broken predictor?); "
                        "it drags the pool's mean AUC down and so inflates the fused model's Gain. Check its spec "
                        "and pretrain.train, or set pretrain.min_val_auc to refuse such members",
                        e.name, e.val_auc)
    if cfg.min_val_auc is None:
        return
    low = [e for e in entries if not e.val_auc >= cfg.min_val_auc]  # NaN is refused too
    if low:
        named = ", ".join(f"{e.name!r} (val AUC {e.val_auc:.4f})" for e in low)
        raise EMMError(f"pool model(s) {named} are below pretrain.min_val_auc {cfg.min_val_auc}; nothing was "
                       f"written to {out_dir}. Fix their spec in pretrain.pool or the settings in pretrain.train "
                       f"and retrain them (emm pretrain --only NAME), or lower pretrain.min_val_auc")


def assemble_pool(entries: list[PoolEntry], work_dir: Path, out_dir: Path, cfg: PretrainConfig, *,
                  sources: dict[str, Path] | None = None, members: list[Member] | None = None,
                  schema: Schema | None = None) -> Path:
    """Write ``pool/`` atomically from the finished work folders (``sources``: other weight files by
    member name, e.g. the current ``pool/``'s, read before it is replaced) with each member's signature
    (``members``: the params entries, needed for imported members; built-in ones sign with their spec) and
    the sha256 of the weights file it was given, taken as soon as that file is written: every load checks
    it (``emm.models.pool.check_weights``), so a file later overwritten or swapped is refused, not loaded.
    With ``schema``, pool.json also records per member the rows labelled for its task in each split
    (``labelled_rows``): what it trained, early-stopped and was scored on."""
    sources = sources or {}
    by_name = {m.name: m for m in members or []}
    recorded: list[PoolEntry] = []
    with atomic_dir(out_dir) as tmp:
        for e in entries:
            target = inside(tmp / e.weights, tmp)
            shared = [o.name for o in recorded if (tmp / o.weights).resolve() == target.resolve()]
            if shared:
                raise EMMError(f"pool models {shared[0]!r} and {e.name!r} would share one weights file "
                               f"{target.name} in {out_dir}; nothing was written. Give them distinct names")
            shutil.copyfile(sources.get(e.name, member_work_file(Path(work_dir) / e.name, e)), target)
            recorded.append(e.model_copy(update={"weights_sha256": sha256_file(target)}))
        write_json(tmp / POOL_FILE, {
            "models": [e.model_dump(mode="json") for e in recorded],
            "signatures": {e.name: member_key(by_name.get(e.name, e.spec), cfg, e.schema_fingerprint)
                           for e in entries},
            **({"labelled_rows": {e.name: {s: schema.labelled_rows(e.task, s) for s in schema.rows}
                                  for e in entries}} if schema is not None else {}),
            "provenance": provenance(digest(cfg))})
    return out_dir


def pretrain(dataset: str, data_dir: Path, out_dir: Path, work_dir: Path, cfg: PretrainConfig, *,
             tracker: Tracker | None = None, resume: bool = False, only: list[str] | None = None,
             progress: bool = True, scale: ScaleConfig | None = None, store: Path = Path("mlruns")) -> list[PoolEntry]:
    """Train (built-in) or import (outside) every pool model, sequentially, each in a child run of
    ``tracker``, and write ``pool/`` (under torchrun: all ranks train, rank 0 alone tracks and writes).
    ``store``: the MLflow store ``uri:`` entries are read from.

    ``only``: train just these members; the others keep their finished results (``finished_member``),
    and when one has none under the current settings nothing is trained and the error names it.
    """
    tracker = tracker or NullTracker()
    schema = Schema.load(data_dir)
    specs = pool_specs(dataset, cfg, schema)
    lonely = [t for t in schema.task_names if t not in {s.task for s in specs}]
    if lonely:
        log.warning("pretrain.pool.%s has no model for task(s) %s: this pool can be listed but not fused (the "
                    "decompose stage refuses it); add an entry for each", dataset, lonely)
    kept: dict[str, tuple[PoolEntry, Path]] = {}
    if only:
        unknown = sorted(set(only) - {s.name for s in specs})
        if unknown:
            raise EMMError(f"--only names unknown pool model(s) {unknown}; the pool is {[s.name for s in specs]}")
        kept = _kept_members([s for s in specs if s.name not in only], cfg, schema, work_dir, out_dir, only)
    to_train = [s for s in specs if s.name not in kept]
    tracker.log_params({"dataset": dataset, "models": [s.name for s in to_train], "rows_train": schema.rows["train"]})
    trained: dict[str, PoolEntry] = {}
    for s in to_train:
        with tracker.child(s.name, tags={"emm.task": s.task, "emm.source": source_of(s)}) as member:
            trained[s.name] = pool_member(s, data_dir, work_dir, cfg, resume=resume, tracker=member,
                                          progress=progress, scale=scale, store=store)
    entries = [trained[s.name] if s.name in trained else kept[s.name][0] for s in specs]
    tracker.log_metrics({f"test_auc_{e.name}": e.test_auc for e in entries})
    screen_members(entries, cfg, out_dir)
    if ddp.current().is_main:
        assemble_pool(entries, work_dir, out_dir, cfg, sources={n: path for n, (_, path) in kept.items()},
                      members=specs, schema=schema)
    return entries


def pool_member(member: Member, data_dir: Path, work_dir: Path, cfg: PretrainConfig, *, resume: bool,
                tracker: Tracker, progress: bool, scale: ScaleConfig | None, store: Path) -> PoolEntry:
    """Train a built-in member, or import an outside one (every rank imports; rank 0 writes)."""
    if isinstance(member, ModelSpec):
        return train_pool_model(member, data_dir, work_dir, cfg, resume=resume, tracker=tracker, progress=progress,
                                scale=scale)
    if isinstance(member, LightGBMSpec):
        return train_lightgbm_member(member, data_dir, work_dir, cfg, resume=resume, tracker=tracker)
    if isinstance(member, TreeFileMember):
        return import_tree_member(member, data_dir, work_dir, tracker=tracker, resume=resume,
                                  write=ddp.current().is_main)
    return import_member(member, data_dir, work_dir, store=store, tracker=tracker, scale=scale, resume=resume,
                         write=ddp.current().is_main)


def _kept_members(others: list[Member], cfg: PretrainConfig, schema: Schema, work_dir: Path, pool_dir: Path,
                  only: list[str]) -> dict[str, tuple[PoolEntry, Path]]:
    """The finished results of the members ``--only`` leaves out, or an error naming those without one."""
    def find() -> dict[str, tuple[dict, str]]:  # rank 0 reads (the folders may be on its machine only)
        out = {}
        for s in others:
            hit = finished_member(s, cfg, schema.fingerprint(), work_dir, pool_dir)
            if hit is not None:
                out[s.name] = (hit[0].model_dump(mode="json"), str(hit[1]))
        return out

    found = ddp.on_main(find)
    missing = [s.name for s in others if s.name not in found]
    if missing:
        raise EMMError(f"--only {only}: pool model(s) {missing} have no trained result under the current "
                       f"pretrain settings (none in {Path(work_dir)}/<name>/entry.json or {Path(pool_dir) / POOL_FILE}"
                       f" with a matching spec, pretrain.train and data schema); nothing was trained. Train "
                       f"them: run `emm pretrain` without --only, or add them to --only")
    for name in found:
        log.info("%s: not retrained (--only), reusing %s", name, found[name][1])
    return {n: (PoolEntry.model_validate(e), Path(p)) for n, (e, p) in found.items()}


# ---- the stage, as the CLI / DVC and the Prefect flow call it ---------------------------------------------------
def pretrain_stage(dataset: str, params: Path | str | None = None, *, resume: bool = False,
                   only: list[str] | None = None, track: bool = True, progress: bool = True) -> list[PoolEntry]:
    """Train the pool; under ``torchrun`` (WORLD_SIZE > 1) as one DDP run over all ranks, rank 0 writing."""
    cfg = load_params(params)
    with ddp.session(cfg.scale), stage_tracker(cfg.tracking, dataset, "pool", enabled=track,
                                               tags={"emm.stage": "pretrain"}) as tracker:
        return pretrain(dataset, stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                        stage_dir(cfg, dataset, "pool-work"), cfg.pretrain, tracker=tracker, resume=resume,
                        only=only, progress=progress, scale=cfg.scale, store=cfg.tracking.store)


def pool_model_names(dataset: str, params: Path | str | None = None) -> list[str]:
    """The pool members of ``dataset`` (from params, else the default pool), in order; needs ``data/``."""
    cfg = load_params(params)
    schema = Schema.load(stage_dir(cfg, dataset, "data"))
    return [s.name for s in pool_specs(dataset, cfg.pretrain, schema)]


def pool_entries(dataset: str, params: Path | str | None = None) -> tuple[Path, list[PoolEntry]]:
    """The members of the current ``pool/`` (for `emm pool list`), with the folder they were read from."""
    folder = stage_dir(load_params(params), dataset, "pool")
    if not (folder / POOL_FILE).is_file():
        raise EMMError(f"{folder / POOL_FILE} does not exist: run `emm pretrain {dataset}` first")
    return folder, read_pool(folder)


def pool_labelled_rows(folder: Path) -> dict[str, dict[str, int]]:
    """Member name -> rows labelled for its task per split, as pool.json records them (empty for a pool
    written before labels could be missing)."""
    return read_json(Path(folder) / POOL_FILE).get("labelled_rows") or {}


def open_pool_run(dataset: str, params: Path | str | None = None, *, models: list[str] | None = None) -> str | None:
    """Start the MLflow parent run ``pool`` the per-model runs nest under (by id: they train in other threads)."""
    from emm.tracking.runs import start_detached_run  # local: an untracked pretrain never imports mlflow

    cfg = load_params(params)
    return start_detached_run(dataset, cfg.tracking.store, "pool", tags={"emm.stage": "pretrain"},
                              params={"dataset": dataset, "models": models or []})


def pretrain_model_stage(dataset: str, params: Path | str | None = None, name: str = "", *,
                         parent_run_id: str | None = None, threads: int | None = None, track: bool = True,
                         progress: bool = False) -> dict:
    """Train (or import) one pool member in ``pool-work/<name>/`` (reused when already finished with the
    same settings, continued from its last checkpoint when interrupted under the same settings, else done
    afresh); returns its pool entry as JSON."""
    cfg = load_params(params)
    data_dir = stage_dir(cfg, dataset, "data")
    specs = {s.name: s for s in pool_specs(dataset, cfg.pretrain, Schema.load(data_dir))}
    if name not in specs:
        raise EMMError(f"pool model {name!r} is not in pretrain.pool.{dataset}; the pool is {list(specs)}")
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))  # per thread: OpenMP's thread count is per calling thread
    with stage_tracker(cfg.tracking, dataset, name, enabled=track, parent_run_id=parent_run_id,
                       tags={"emm.task": specs[name].task, "emm.source": source_of(specs[name])}) as tracker:
        entry = pool_member(specs[name], data_dir, stage_dir(cfg, dataset, "pool-work"), cfg.pretrain,
                            resume=True, tracker=tracker, progress=progress, scale=cfg.scale, store=cfg.tracking.store)
    return entry.model_dump(mode="json")


def assemble_pool_stage(dataset: str, params: Path | str | None = None, entries: list[dict] | None = None, *,
                        parent_run_id: str | None = None) -> list[dict]:
    """Write ``pool/`` atomically from the finished per-model entries (in pool order) and close the
    parent run with each member's test AUC."""
    cfg = load_params(params)
    by_name = {e["name"]: PoolEntry.model_validate(e) for e in entries or []}
    order = pool_model_names(dataset, params)
    missing = [n for n in order if n not in by_name]
    if missing:
        raise EMMError(f"pool model(s) {missing} have not been trained; run pretraining for them first")
    ordered = [by_name[n] for n in order]
    screen_members(ordered, cfg.pretrain, stage_dir(cfg, dataset, "pool"))
    schema = Schema.load(stage_dir(cfg, dataset, "data"))
    members = pool_specs(dataset, cfg.pretrain, schema)
    assemble_pool(ordered, stage_dir(cfg, dataset, "pool-work"), stage_dir(cfg, dataset, "pool"), cfg.pretrain,
                  members=members, schema=schema)
    if parent_run_id:
        close_pool_run(parent_run_id, params, failed=False, metrics={f"test_auc_{e.name}": e.test_auc for e in ordered})
    return [e.model_dump(mode="json") for e in ordered]


def close_pool_run(run_id: str | None, params: Path | str | None = None, *, failed: bool = True,
                   metrics: dict[str, float] | None = None) -> None:
    """End the parent run (FAILED when pretraining did not get to ``assemble_pool_stage``)."""
    if run_id:
        from emm.tracking.runs import end_detached_run  # local: as in open_pool_run

        end_detached_run(run_id, load_params(params).tracking.store, metrics=metrics,
                         status="FAILED" if failed else "FINISHED")
