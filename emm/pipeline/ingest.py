"""Stage 1, ``fetch`` + ``ingest`` (and ``synth``): raw files -> ``artifacts/<dataset>/data/``."""

from __future__ import annotations

from pathlib import Path

from emm.data.fetch import fetch_data
from emm.data.ingest import ingest
from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.data.synth import synthesize
from emm.errors import EMMError
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import load_params


def raw_dir(dataset: str, params: Path | str | None = None) -> Path:
    """Where the raw files of ``dataset`` live (``paths.raw_root/<dataset>``)."""
    return load_params(params).paths.raw_root / dataset


def fetch_stage(dataset: str, params: Path | str | None = None, *, mirror: Path | None = None,
                dest: Path | None = None) -> list[str]:
    cfg = load_params(params)
    spec = resolve_dataset(dataset, cfg.datasets)
    return fetch_data(spec, dest or cfg.paths.raw_root / dataset, mirror)


def ingest_stage(dataset: str, params: Path | str | None = None, *, raw_dir: Path | None = None,
                 out_dir: Path | None = None, tasks: list[str] | None = None) -> Schema:
    cfg = load_params(params)
    spec = resolve_dataset(dataset, cfg.datasets)
    return ingest(spec, raw_dir or cfg.paths.raw_root / dataset, out_dir or stage_dir(cfg, dataset, "data"),
                  cfg.ingest, tasks)


def synth_stage(params: Path | str | None = None, *, rows: int | None = None, out_dir: Path | None = None,
                seed: int | None = None) -> Schema:
    """``emm synth``: a synthetic AliExpress-layout dataset, written ready to train on (``data/`` format)."""
    cfg = load_params(params)
    overrides = {k: v for k, v in {"rows": rows, "seed": seed}.items() if v is not None}
    try:
        scfg = type(cfg.synth).model_validate({**cfg.synth.model_dump(), **overrides})
    except ValueError as exc:  # pydantic's ValidationError, e.g. --rows 0
        raise EMMError(f"emm synth: {exc}") from exc
    return synthesize(scfg, out_dir or stage_dir(cfg, scfg.dataset, "data"))
