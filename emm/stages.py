"""The pipeline's stage functions: the one place where params.yaml turns into library calls.

Why a module of its own: the CLI (and so ``dvc repro``) and the Prefect flow must run the *same* code
with the same defaults; each of them only forwards its arguments here.
"""

from __future__ import annotations

from pathlib import Path

from emm.config import Params, load_params
from emm.data.schema import Schema


def stage_dir(cfg: Params, dataset: str, stage: str) -> Path:
    """artifacts/<dataset>/<stage>/ : each stage owns exactly one folder."""
    return cfg.paths.artifacts / dataset / stage


def ingest_stage(dataset: str, params: Path | str | None = None, *, raw_dir: Path | None = None,
                 out_dir: Path | None = None, tasks: list[str] | None = None) -> Schema:
    from emm.data.ingest import ingest
    from emm.data.spec import resolve_dataset

    cfg = load_params(params)
    spec = resolve_dataset(dataset, cfg.datasets)
    return ingest(spec, raw_dir or cfg.paths.raw_root / dataset, out_dir or stage_dir(cfg, dataset, "data"),
                  cfg.ingest, tasks)


def fetch_stage(dataset: str, params: Path | str | None = None, *, mirror: Path | None = None,
                dest: Path | None = None) -> list[str]:
    from emm.data.fetch import fetch_data
    from emm.data.spec import resolve_dataset

    cfg = load_params(params)
    spec = resolve_dataset(dataset, cfg.datasets)
    return fetch_data(spec, dest or cfg.paths.raw_root / dataset, mirror)


def pretrain_stage(dataset: str, params: Path | str | None = None, *, resume: bool = False,
                   only: list[str] | None = None, track: bool = True, progress: bool = True):
    """Train the pool; under ``torchrun`` (WORLD_SIZE > 1) as one DDP run over all ranks, rank 0 writing."""
    from emm.train.distributed import session
    from emm.train.pretrain import pretrain

    cfg = load_params(params)
    with session(cfg.scale):
        return pretrain(dataset, stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                        stage_dir(cfg, dataset, "pool-work"), cfg.pretrain,
                        tracking=cfg.tracking if track else None, resume=resume, only=only, progress=progress,
                        scale=cfg.scale)


def decompose_stage(dataset: str, params: Path | str | None = None):
    from emm.fusion.pool_plan import decompose_pool

    cfg = load_params(params)
    return decompose_pool(stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                          stage_dir(cfg, dataset, "components"), cfg.decompose)


def fuse_stage(dataset: str, params: Path | str | None = None, *, resume: bool = False, track: bool = True,
               progress: bool = True):
    """Train the fused model; under ``torchrun`` (WORLD_SIZE > 1) as one DDP run, rank 0 writing."""
    from emm.fusion.fused_io import fuse
    from emm.train.distributed import session

    cfg = load_params(params)
    with session(cfg.scale):
        return fuse(dataset, stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                    stage_dir(cfg, dataset, "components"), stage_dir(cfg, dataset, "fused"),
                    stage_dir(cfg, dataset, "fused-work"), cfg.fuse, cfg.decompose,
                    tracking=cfg.tracking if track else None, resume=resume, progress=progress, scale=cfg.scale)


def synth_stage(params: Path | str | None = None, *, rows: int | None = None, out_dir: Path | None = None,
                seed: int | None = None) -> Schema:
    """``emm synth``: a synthetic AliExpress-layout dataset, written ready to train on (``data/`` format)."""
    from emm.data.synth import synthesize

    cfg = load_params(params)
    overrides = {k: v for k, v in {"rows": rows, "seed": seed}.items() if v is not None}
    try:
        scfg = type(cfg.synth).model_validate({**cfg.synth.model_dump(), **overrides})
    except ValueError as exc:  # pydantic's ValidationError, e.g. --rows 0
        from emm.errors import EMMError

        raise EMMError(f"emm synth: {exc}") from exc
    return synthesize(scfg, out_dir or stage_dir(cfg, scfg.dataset, "data"))


def evaluate_stage(dataset: str, params: Path | str | None = None, *, register: bool = True):
    from emm.fusion.evaluate import evaluate

    cfg = load_params(params)
    return evaluate(dataset, stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                    stage_dir(cfg, dataset, "fused"), stage_dir(cfg, dataset, "eval"),
                    tracking=cfg.tracking if register else None)


def promote_stage(dataset: str, params: Path | str | None = None, *, version: str | None = None):
    from emm.tracking import promote

    cfg = load_params(params)
    return promote(dataset, cfg.tracking.store, version)


def predict_stage(model_uri: str, input_path: Path, output_path: Path, params: Path | str | None = None):
    from emm.predict import predict_file
    from emm.tracking import load_scorer

    cfg = load_params(params)
    return predict_file(load_scorer(model_uri, cfg.tracking.store), input_path, output_path)


# ---- pretraining one model at a time (Prefect trains the pool members as concurrent tasks) -------------------
def pool_model_names(dataset: str, params: Path | str | None = None) -> list[str]:
    """The pool members of ``dataset`` (from params, else the default pool), in order; needs ``data/``."""
    from emm.train.pretrain import pool_specs

    cfg = load_params(params)
    schema = Schema.load(stage_dir(cfg, dataset, "data"))
    return [s.name for s in pool_specs(dataset, cfg.pretrain, schema)]


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads_for(concurrent: int) -> int:
    """Torch threads each of ``concurrent`` trainings may use.

    Why: two torch processes (or threads) that each spin a full-size thread pool on the same cores slow
    each other 10-100x; splitting the cores (or OMP_NUM_THREADS when set, the caller's budget) avoids it.
    """
    import os

    cores = cpu_cores()
    budget = os.environ.get("OMP_NUM_THREADS", "")
    if budget.isdigit() and int(budget) > 0:
        cores = min(cores, int(budget))
    return max(1, cores // max(1, concurrent))


def open_pool_run(dataset: str, params: Path | str | None = None, *, models: list[str] | None = None) -> str | None:
    """Start the MLflow parent run ``pool`` the per-model runs nest under; None when tracking is off.

    Why an explicit id instead of the fluent ``with run(...)``: the pool members train in other threads
    (Prefect tasks), so the parent cannot be "the active run" of the thread that trains them.
    """
    from emm import tracking as mt

    cfg = load_params(params)
    return mt.start_detached_run(dataset, cfg.tracking.store, "pool", tags={"emm.stage": "pretrain"},
                                 params={"dataset": dataset, "models": models or []})


def pretrain_model_stage(dataset: str, params: Path | str | None = None, name: str = "", *,
                         parent_run_id: str | None = None, threads: int | None = None, track: bool = True,
                         progress: bool = False) -> dict:
    """Train one pool member in ``pool-work/<name>/`` (reused when already finished with the same
    settings, continued from its last checkpoint when interrupted); returns its pool entry as JSON."""
    from emm.errors import EMMError
    from emm.train.pretrain import pool_specs, train_pool_model

    cfg = load_params(params)
    data_dir = stage_dir(cfg, dataset, "data")
    specs = {s.name: s for s in pool_specs(dataset, cfg.pretrain, Schema.load(data_dir))}
    if name not in specs:
        raise EMMError(f"pool model {name!r} is not in pretrain.pool.{dataset}; the pool is {list(specs)}")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))  # per thread: OpenMP's thread count is per calling thread
    tracking = cfg.tracking if track else None
    if tracking is not None:
        from emm import tracking as mt

        mt.use_experiment(dataset, tracking.store)
    entry = train_pool_model(specs[name], data_dir, stage_dir(cfg, dataset, "pool-work"), cfg.pretrain,
                             resume=True, tracking=tracking, parent_run_id=parent_run_id, progress=progress,
                             scale=cfg.scale)
    return entry.model_dump(mode="json")


def assemble_pool_stage(dataset: str, params: Path | str | None = None, entries: list[dict] | None = None, *,
                        parent_run_id: str | None = None) -> list[dict]:
    """Write ``pool/`` atomically from the finished per-model entries (in pool order) and close the
    parent run with each member's test AUC."""
    from emm.errors import EMMError
    from emm.models.pool import PoolEntry
    from emm.train.pretrain import assemble_pool

    cfg = load_params(params)
    by_name = {e["name"]: PoolEntry.model_validate(e) for e in entries or []}
    missing = [n for n in pool_model_names(dataset, params) if n not in by_name]
    if missing:
        raise EMMError(f"pool model(s) {missing} have not been trained; run pretraining for them first")
    ordered = [by_name[n] for n in pool_model_names(dataset, params)]
    assemble_pool(ordered, stage_dir(cfg, dataset, "pool-work"), stage_dir(cfg, dataset, "pool"), cfg.pretrain)
    if parent_run_id:
        from emm import tracking as mt

        mt.end_detached_run(parent_run_id, cfg.tracking.store,
                            metrics={f"test_auc_{e.name}": e.test_auc for e in ordered})
    return [e.model_dump(mode="json") for e in ordered]


def close_pool_run(run_id: str | None, params: Path | str | None = None, *, failed: bool = True) -> None:
    """End the parent run when pretraining did not get to ``assemble_pool_stage`` (e.g. a member failed)."""
    if run_id:
        from emm import tracking as mt

        mt.end_detached_run(run_id, load_params(params).tracking.store, status="FAILED" if failed else "FINISHED")


def fuse_summary(dataset: str, params: Path | str | None = None) -> dict[str, float]:
    """Test AUC per task of the saved fused model (what the fuse stage reported), read from ``fused/``."""
    from emm.fusion.fused_io import FUSED_JSON
    from emm.io import read_json

    cfg = load_params(params)
    meta = read_json(stage_dir(cfg, dataset, "fused") / FUSED_JSON)
    return {t: m["auc"] for t, m in meta["test"].items()}


def raw_dir(dataset: str, params: Path | str | None = None) -> Path:
    """Where the raw files of ``dataset`` live (``paths.raw_root/<dataset>``)."""
    return load_params(params).paths.raw_root / dataset


# ---- cache keys for orchestrators: a stage's inputs, hashed ---------------------------------------------------
# stage -> (upstream stage, params sections it reads, emm sub-packages/modules its code lives in, the file
# that marks its output complete). Mirrors dvc.yaml's deps/params so Prefect and DVC rerun the same things.
STAGE_INPUTS: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...], str]] = {
    "ingest": (None, ("paths", "ingest", "datasets"), ("data",), "data/schema.json"),
    "pretrain-model": ("ingest", ("pretrain.train", "scale"), ("models", "train"), "pool-work/{name}/entry.json"),
    "pretrain": ("ingest", ("pretrain", "scale"), ("models", "train"), "pool/pool.json"),
    "decompose": ("pretrain", ("decompose",), ("fusion",), "components/plan.json"),
    "fuse": ("decompose", ("fuse", "decompose", "scale"), ("fusion",), "fused/fused.json"),
    "evaluate": ("fuse", ("tracking",), ("fusion", "tracking.py"), "eval/metrics.json"),
}


def _tree_digest(paths: list[Path], suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the relative names and contents of the files under ``paths`` (sorted; missing -> marker)."""
    import hashlib

    digest = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        if not files:
            digest.update(f"<missing {root.name}>".encode())
        for f in files:
            if suffixes and f.suffix not in suffixes:
                continue
            digest.update(str(f.relative_to(root) if f != root else f.name).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


def _section(cfg: Params, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def stage_cache_key(dataset: str, params: Path | str | None, stage: str, name: str | None = None) -> str:
    """A key that changes exactly when the stage's inputs change: the raw data's bytes (for ingest) or the
    upstream stage's key, the params sections the stage reads, the stage's own code, and where it writes.

    Why keys chain instead of hashing upstream *outputs*: outputs carry timestamps (provenance), so a
    recomputed but identical upstream folder would otherwise invalidate everything below it.
    """
    import hashlib

    import emm
    from emm.config import params_hash

    if stage not in STAGE_INPUTS:
        raise ValueError(f"unknown stage {stage!r}; one of {list(STAGE_INPUTS)}")
    cfg = load_params(params)
    upstream, sections, code, _ = STAGE_INPUTS[stage]
    package = Path(emm.__file__).parent
    parts = [stage, dataset, str(cfg.paths.artifacts.resolve()), emm.__version__,
             *(f"{s}={params_hash(_section(cfg, s))}" for s in sections),
             _tree_digest([package / c for c in code], suffixes=(".py", ".yaml"))]
    if upstream is None:
        parts.append(_tree_digest([cfg.paths.raw_root / dataset]))
    else:
        parts.append(stage_cache_key(dataset, params, upstream))
    if stage == "pretrain-model":
        from emm.train.pretrain import pool_specs

        specs = {s.name: s for s in pool_specs(dataset, cfg.pretrain, Schema.load(stage_dir(cfg, dataset, "data")))}
        parts.append(f"{name}={params_hash(specs[name]) if name in specs else '<unknown>'}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def stage_output_ready(dataset: str, params: Path | str | None, stage: str, name: str | None = None) -> bool:
    """Whether the stage's output folder is still there (its completion file exists): a cached result is
    only worth reusing then; a deleted folder must be recomputed, whatever the cache says."""
    cfg = load_params(params)
    marker = cfg.paths.artifacts / dataset / STAGE_INPUTS[stage][3].format(name=name)
    if not marker.is_file():
        return False
    if stage == "evaluate":  # its output includes a registry version: void if the MLflow store lost it
        from emm import tracking as mt
        from emm.io import read_json

        return mt.model_version_exists(dataset, cfg.tracking.store, read_json(marker).get("registered_version"))
    return True


def benchmark_stage(dataset: str, params: Path | str | None = None, *, profile: str | None = None,
                    workers: int | None = None, track: bool = True):
    """Issue 6: Table I, Table II and Figure 3 for ``dataset`` (see emm/benchmark)."""
    from emm.benchmark import run_benchmark

    return run_benchmark(dataset, params, profile=profile, workers=workers, track=track)
