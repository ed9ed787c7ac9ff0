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
    from emm.train.pretrain import pretrain

    cfg = load_params(params)
    return pretrain(dataset, stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                    stage_dir(cfg, dataset, "pool-work"), cfg.pretrain,
                    tracking=cfg.tracking if track else None, resume=resume, only=only, progress=progress)


def decompose_stage(dataset: str, params: Path | str | None = None):
    from emm.fusion.pool_plan import decompose_pool

    cfg = load_params(params)
    return decompose_pool(stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                          stage_dir(cfg, dataset, "components"), cfg.decompose)


def fuse_stage(dataset: str, params: Path | str | None = None, *, resume: bool = False, track: bool = True,
               progress: bool = True):
    from emm.fusion.fused_io import fuse

    cfg = load_params(params)
    return fuse(dataset, stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                stage_dir(cfg, dataset, "components"), stage_dir(cfg, dataset, "fused"),
                stage_dir(cfg, dataset, "fused-work"), cfg.fuse, cfg.decompose,
                tracking=cfg.tracking if track else None, resume=resume, progress=progress)


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
