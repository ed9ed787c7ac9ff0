"""Schedule the benchmark's jobs over worker processes, reuse finished ones, log everything to MLflow.

The job graph per task set and seed: pool models -> decompose (assemble ``pool/``, cut components) ->
fused variants (Table II ablations; ``full`` is EMM). A pool with tree members (``arch: lightgbm``) is fused
whole (the trees join at the output) and, for Table I's "EMM (fused, networks only)", on its networks alone:
two views of the pool (``members``), each decomposed by a job of its own. Baselines and LightGBM depend on nothing. The
scheduler keeps ``workers`` jobs in flight and always starts the ready job on the critical path first
(decompose, then fused, then pool models), so the long fused trainings do not queue behind baselines.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.errors import EMMError
from emm.fusion.options import ABLATIONS
from emm.models.external import parse_member
from emm.models.single_task import ModelSpec
from emm.models.trees import LightGBMSpec
from emm.pipeline.layout import stage_tracker
from emm.pipeline.params import FuseConfig
from emm.pipeline.pool_specs import default_pool, with_numeric
from emm.runtime import cpu_cores

from harness.experiments.data import prepare_task_set, task_set_key
from harness.experiments.jobs import PRIORITY, Job, cached_result, describe, init_worker, run_job
from harness.experiments.members import (NETWORKS_EMM, VIEWS, WHOLE, PoolView, check_recipes, job_config, resolve,
                                         split_recipe)
from harness.experiments.recipes import write_recipes
from harness.experiments.report import write_reports
from harness.params import BASELINE_NAMES, BenchmarkProfile, HarnessParams, load_harness_params

log = logging.getLogger(__name__)


@dataclass
class BenchmarkRun:
    dataset: str
    profile: str
    out_dir: Path
    results: list[dict[str, Any]]
    files: list[Path]
    seconds: float
    mlflow_run_id: str | None


def output_dir(cfg: HarnessParams, dataset: str, profile: str) -> Path:
    """results/<dataset>/ for the default profile (what the README shows), results/<dataset>/<profile>/ else."""
    base = cfg.benchmark.out / dataset
    return base if profile == cfg.benchmark.profile else base / profile


def benchmark_pool(dataset: str, cfg: HarnessParams, schema: Schema) -> list[dict[str, Any]]:
    """The configured pool for the tasks it covers, plus, for any task it does not (the 3- and 4-task runs add
    tasks the 2-task pool has no model for), two default networks and a copy of each of the configured pool's
    tree kinds (``tree_kinds``): a pool given LightGBM donors keeps them on every task of Figure 3."""
    everything = cfg.pretrain.pool.get(dataset, [])
    configured = [s for s in everything if s["task"] in schema.task_names]
    covered = {s["task"] for s in configured}
    missing = [t for t in schema.task_names if t not in covered]
    if not missing:
        return configured
    spine = next((s["hidden"] for s in configured if s.get("hidden")), None)  # share layers with the rest
    kinds = tree_kinds(everything)
    return configured + default_pool(missing, spine) + [
        {**settings, "name": f"{task}-{suffix}", "task": task} for task in missing for suffix, settings in kinds]


def tree_kinds(pool: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The configured pool's built-in tree entries (``arch: lightgbm``) as (name suffix, settings), one per distinct
    setting: ``income-lgbm-codes`` -> ``("lgbm-codes", {arch: lightgbm, categorical: false})``. A name that does
    not start with its task is used whole as the suffix."""
    kinds: dict[str, tuple[str, dict[str, Any]]] = {}
    for entry in pool:
        if not (isinstance(entry, dict) and entry.get("arch") == "lightgbm"):
            continue
        settings = {k: v for k, v in entry.items() if k not in ("name", "task")}
        name, task = str(entry["name"]), str(entry["task"])
        suffix = name[len(task) + 1:] if name.startswith(task + "-") else name
        key = repr(sorted(settings.items()))
        if key not in kinds:
            used = {s for s, _ in kinds.values()}
            kinds[key] = (suffix if suffix not in used else f"{suffix}-{len(kinds) + 1}", settings)
    return list(kinds.values())


def parse_builtin(raw: dict[str, Any], where: str) -> ModelSpec | LightGBMSpec:
    """A benchmark pool entry, checked like ``emm pretrain`` checks it (name, fields), built-in only: a network
    or a LightGBM (``arch: lightgbm``, joining the fused model at the output)."""
    member = parse_member(raw, where)
    if not isinstance(member, (ModelSpec, LightGBMSpec)):
        raise EMMError(f"{where} ({member.name!r}) is an outside model; the benchmark trains every pool member "
                       "itself on each seed, so its pool takes built-in entries (`arch:`, `arch: lightgbm` "
                       "included) only")
    return member


# fuse settings added after results were stored, each with its "off" value: a job's config leaves such a
# setting out while it is off, so the fused jobs stored before it existed (the same work) stay reusable.
# Why not a canonical form of the fuse plan that drops whatever is off: the config is also what a job rebuilds
# its FuseConfig from, and stored jobs carry every older setting as params.yaml spells it (finetune_lr_scale:
# null included), so such a signature would re-run all of them. Left out or not, the config gives the same
# FusePlan (tests/unit/test_fuse_plan.py).
FUSE_ADDED_OFF = {"distill": 0.0}


def fuse_job_config(fuse: FuseConfig) -> dict[str, Any]:
    """A fused job's fuse settings as its signature sees them (``FUSE_ADDED_OFF`` left out while off)."""
    dumped = fuse.model_dump(mode="json")
    return {k: v for k, v in dumped.items() if not (k in FUSE_ADDED_OFF and v == FUSE_ADDED_OFF[k])}


def plan_jobs(dataset: str, cfg: HarnessParams, prof: BenchmarkProfile, data_dirs: dict[str, Path], main_set: str,
              work: Path) -> list[Job]:
    """Every job of the benchmark, with its dependencies."""
    def train_cfg(base, seed: int) -> dict[str, Any]:
        update = {"seed": seed, **({"max_epochs": prof.max_epochs} if prof.max_epochs else {})}
        return base.model_copy(update=update).model_dump(mode="json")

    size = cfg.benchmark.baseline_size.get(dataset) or cfg.benchmark.default_baseline_size
    jobs: list[Job] = []
    for ts, data_dir in data_dirs.items():
        is_main = ts == main_set
        schema = Schema.load(data_dir)
        seeds = prof.seeds if is_main else prof.seeds[:prof.task_set_seeds]
        baselines = prof.baselines if is_main else [b for b in prof.task_set_methods if b in BASELINE_NAMES]
        ablations = [a for a in ABLATIONS if a in prof.ablations or a == "full"] if is_main else ["full"]
        specs = [parse_builtin(with_numeric(s, cfg.pretrain), f"pretrain.pool.{dataset}[{i}]")
                 for i, s in enumerate(benchmark_pool(dataset, cfg, schema))]
        if prof.numeric:  # the profile's encoding for every model alike (a tree reads the dense values as they are)
            specs = [s.model_copy(update={"numeric": prof.numeric}) if isinstance(s, ModelSpec) else s for s in specs]
        encoding = prof.numeric or cfg.pretrain.numeric
        # minmax is every builder's default: left out, so baseline jobs keep the signatures they had before it existed
        numeric = {"numeric": encoding.model_dump(mode="json")} if encoding.mode != "minmax" else {}
        for seed in seeds:  # the parts with a seed budget run on the first N of the profile's seeds (None: all)
            seed_ablations = [a for a in ablations if a == "full" or seed in seeds[:prof.ablation_seeds]]
            seed_recipes = prof.recipes if seed in seeds[:prof.recipe_seeds] else {}
            seed_dir = str(work / ts / f"seed-{seed}")
            common = {"seed": seed, "task_set": ts, "dataset": dataset, "data_dir": str(data_dir), "seed_dir": seed_dir}
            pool_jobs = [Job("pool", s.name, config={"spec": s.model_dump(mode="json"),
                                                      "train": train_cfg(cfg.pretrain.train, seed)}, **common)
                         for s in specs]
            decomposes: dict[str, Job] = {}  # one per view of the pool the seed's fused jobs read

            def decompose(view: PoolView) -> Job:
                if view.name not in decomposes:
                    kept = [j for j, s in zip(pool_jobs, specs) if view.keeps(s)]
                    decomposes[view.name] = Job("decompose", view.decompose_method, config={
                        "pool_results": [str(j.result_path) for j in kept],
                        "train": train_cfg(cfg.pretrain.train, seed),
                        "decompose": cfg.decompose.model_dump(mode="json"), **job_config(view)},
                        needs=tuple(j.key for j in kept), **common)
                return decomposes[view.name]

            def fused_job(kind: str, method: str, fuse: FuseConfig, view: PoolView) -> Job:
                return Job(kind, method, needs=(decompose(view).key,), config={
                    "fuse": fuse_job_config(fuse), "decompose": cfg.decompose.model_dump(mode="json"),
                    **job_config(view)}, **common)

            whole = VIEWS[WHOLE]
            seed_fuse = cfg.fuse.model_copy(update={"train": cfg.fuse.train.model_copy(
                update=train_cfg(cfg.fuse.train, seed))})
            fused = [fused_job("fused", ab, seed_fuse.model_copy(update={"ablation": ab}), whole)
                     for ab in seed_ablations]
            networks = resolve("networks", specs, f"pretrain.pool.{dataset}")
            if networks is not whole:  # tree members: EMM with them (above) and on the networks alone
                fused.append(fused_job("fused", NETWORKS_EMM, seed_fuse.model_copy(update={"ablation": "full"}),
                                       networks))
            others = [Job("baseline", b, config={"train": train_cfg(cfg.pretrain.train, seed), "kwargs": {**(
                size if b != "shared_bottom" else {"tower": size["tower"]}), **numeric}}, **common)
                      for b in baselines]
            if is_main:
                for name, settings in seed_recipes.items():
                    members, overrides = split_recipe(name, settings)
                    fuse = FuseConfig.model_validate({**cfg.fuse.model_dump(mode="json"), **overrides,
                                                      "train": {**train_cfg(cfg.fuse.train, seed),
                                                                **overrides.get("train", {})}})
                    others.append(fused_job("recipe", name, fuse, resolve(members, specs, f"recipe {name!r}")))
            if prof.lightgbm:
                others.append(Job("lightgbm", "lightgbm", config={"threads": 1}, **common))
            jobs += [*pool_jobs, *decomposes.values(), *fused, *others]
    return jobs


def execute(jobs: list[Job], fingerprints: dict[str, str], workers: int, on_result) -> list[dict[str, Any]]:
    """Run the job graph; finished jobs with unchanged inputs are not run again."""
    by_key = {j.key: j for j in jobs}
    done: dict[str, dict[str, Any]] = {}
    recomputed: set[str] = set()
    pending = list(jobs)
    running: dict[Future, Job] = {}
    threads = 1 if workers > 1 else 0  # one worker may use every core
    started = time.perf_counter()

    def signature(job: Job) -> str:
        return job.signature(fingerprints[job.task_set] + "".join(sorted(
            by_key[n].signature(fingerprints[job.task_set]) for n in job.needs)))

    ctx = get_context("spawn")  # fork after torch started its thread pools can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                             initargs=(threads or cpu_cores(),)) as pool:
        while pending or running:
            reused = True
            while reused:  # reuse what an earlier run finished with the same inputs (and its dependants)
                reused = False
                for job in [j for j in pending if all(n in done for n in j.needs)]:
                    if any(n in recomputed for n in job.needs):
                        continue
                    cached = cached_result(job, signature(job))
                    if cached is not None:
                        pending.remove(job)
                        cached = done[job.key] = {**cached, "reused": True}
                        on_result(job, cached, True)
                        reused = True
            ready = sorted((j for j in pending if all(n in done for n in j.needs)), key=lambda j: PRIORITY[j.kind])
            while ready and len(running) < workers:
                job = ready.pop(0)
                pending.remove(job)
                running[pool.submit(run_job, job, signature(job))] = job
            if not running:
                if pending:
                    continue
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:
                    for other in running:
                        other.cancel()
                    raise EMMError(f"benchmark job {job.label} failed: {exc}. Finished jobs are kept; "
                                   f"run the benchmark again to resume") from exc
                done[job.key] = result
                recomputed.add(job.key)
                on_result(job, result, False)
                n_done, n_all = len(done), len(jobs)
                elapsed = time.perf_counter() - started
                log.info("[%d/%d %.0f min] %s: %s (%.0f s)", n_done, n_all, elapsed / 60, job.label, describe(result),
                         result.get("wall_seconds", 0))
    return [done[j.key] for j in jobs]


def child_logger(tracker, main_set: str | None) -> Callable[[Job, dict[str, Any], bool], None]:
    """``execute``'s callback: one MLflow child run per finished (or reused) training job."""
    def log_child(job: Job, result: dict[str, Any], cached: bool) -> None:
        if job.kind == "decompose":
            return
        with tracker.child(f"{job.method}-s{job.seed}" + ("" if job.task_set == main_set else f"-{job.task_set}"),
                           tags={"emm.benchmark.kind": job.kind, "emm.benchmark.cached": str(cached)}) as child:
            child.log_params({"kind": job.kind, "method": job.method, "seed": job.seed, "task_set": job.task_set})
            child.log_metrics({f"{k}_{t}": v for t, m in result["tasks"].items() for k, v in m.items()}
                              | {k: result[k] for k in ("seconds", "epochs_run") if k in result})
    return log_child


def run_benchmark(dataset: str, params: Path | str | None = None, *, config: Path | str | None = None,
                  profile: str | None = None, workers: int | None = None, track: bool = True) -> BenchmarkRun:
    """Table I, Table II and Figure 3 for ``dataset``: data, jobs, tables, plots, one MLflow parent run.
    ``params``: emm's params file; ``config``: the harness's (default harness/benchmark.yaml)."""
    started = time.perf_counter()
    cfg = load_harness_params(params, config)
    profile = profile or cfg.benchmark.profile
    prof = cfg.benchmark.pick(profile)
    check_recipes(prof.recipes)
    spec = resolve_dataset(dataset, cfg.datasets)
    out_dir = output_dir(cfg, dataset, profile)
    work = cfg.benchmark.out / dataset / "raw" / cfg.benchmark.store(profile)
    main_tasks = list(cfg.ingest.tasks.get(dataset) or spec.default_tasks)
    task_sets = [main_tasks] + [list(t) for t in prof.task_sets.get(dataset, []) if list(t) != main_tasks]
    raw_dir = cfg.paths.raw_root / dataset
    data_dirs = {task_set_key(t): prepare_task_set(spec, raw_dir, t, work, cfg.ingest, prof.raw_rows)
                 for t in task_sets}
    main_set = task_set_key(main_tasks)
    schemas = {ts: Schema.load(d) for ts, d in data_dirs.items()}
    jobs = plan_jobs(dataset, cfg, prof, data_dirs, main_set, work)
    n_workers = workers or cfg.benchmark.workers
    log.info("benchmark %s (profile %s): %d jobs on %d worker(s), task sets %s", dataset, profile, len(jobs),
             n_workers, list(data_dirs))

    with stage_tracker(cfg.tracking, dataset, f"benchmark-{profile}", enabled=track,
                       tags={"emm.stage": "benchmark"}) as tracker:
        tracker.log_params({"dataset": dataset, "profile": profile, "seeds": prof.seeds, "workers": n_workers,
                            "task_sets": list(data_dirs), **{f"rows_{s}": n for s, n in schemas[main_set].rows.items()}})

        results = execute(jobs, {ts: s.fingerprint() for ts, s in schemas.items()}, n_workers,
                          child_logger(tracker, main_set))
        seconds = time.perf_counter() - started
        recipe = {**cfg.fuse.akf.model_dump(mode="json"), "blend_init": cfg.fuse.blend_init}
        files = write_reports(dataset, profile, results, schemas, main_set, out_dir, seconds, recipe)
        if prof.recipes:
            files.append(write_recipes(dataset, results, main_set, schemas[main_set].task_names, prof.recipes, out_dir))
        tracker.log_metrics({"benchmark_seconds": seconds})
        for f in files:
            tracker.log_artifact(f, "benchmark")
    log.info("benchmark %s done in %.1f min: %s", dataset, seconds / 60, out_dir)
    return BenchmarkRun(dataset, profile, out_dir, results, files, seconds, tracker.run_id)
