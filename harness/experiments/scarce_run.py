"""Run the scarce-label plan: per data variant, make the data, train its jobs, measure its cells.

The data: an ``emm synth`` table with ``synth.label_fraction`` (``relatedness.synth_level``, reused when the
same config wrote it) or Census ingested with ``ingest.label_fraction`` (``data.prepare_task_set``). The
jobs: exactly ``emm benchmark``'s (``runner.plan_jobs``: pool members, decompose, EMM, the recipes, the MTL
baselines, LightGBM), in a job store under ``<out>/<dataset>/raw/scarce[-quick]/<variant>/``, cached by
signature, so an interrupted run resumes mid-variant. A measured cell is written to
``<out>/<dataset>/scarce[-quick]/cells/<cell>.json`` (+ ``.npz``, its test scores) and reused when its
signature matches, so a finished variant is not even planned again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.errors import EMMError
from emm.io import atomic_file, read_json, write_json
from emm.pipeline.layout import stage_tracker

from harness.experiments.data import prepare_task_set
from harness.experiments.relatedness import synth_level
from harness.experiments.runner import child_logger, execute, plan_jobs
from harness.experiments.scarce_measure import measure_cell
from harness.experiments.scarce_plan import (Cell, DataVariant, ScarceProfile, cell_signature, load_scarce_config,
                                             plan_cells, synth_config, variants)
from harness.experiments.scarce_report import write_report
from harness.params import BenchmarkProfile, HarnessParams, load_harness_params

log = logging.getLogger(__name__)


@dataclass
class ScarceRun:
    dataset: str
    variant: str
    out_dir: Path
    cells: list[Cell]
    records: list[dict[str, Any]]
    files: list[Path]
    seconds: float
    trained: int   # cells measured now (the rest were reused from disk)
    failed: dict[str, str]   # cell key -> why (its variant's data or jobs failed; the other variants still ran)


def folder_name(variant: str) -> str:
    """results/<dataset>/scarce/ for the full grid, scarce-<variant>/ for the others (quick)."""
    return "scarce" if variant == "full" else f"scarce-{variant}"


def data_settings(cfg: HarnessParams, prof: ScarceProfile, v: DataVariant) -> dict[str, Any]:
    """What a variant's data is made from (part of each of its cells' signatures)."""
    if v.family == "synth":
        return {"synth": synth_config(cfg, prof, v).model_dump(mode="json")}
    ingest = cfg.ingest.model_copy(update={"label_fraction": dict(v.label_fraction)})
    return {"ingest": ingest.model_dump(mode="json"), "raw_rows": prof.census.raw_rows}


def make_data(dataset: str, cfg: HarnessParams, prof: ScarceProfile, v: DataVariant, work: Path) -> Path:
    if v.family == "synth":
        return synth_level(synth_config(cfg, prof, v), work / v.key / "data")
    spec = resolve_dataset(dataset, cfg.datasets)
    tasks = list(cfg.ingest.tasks.get(dataset) or spec.default_tasks)
    ingest = cfg.ingest.model_copy(update={"label_fraction": dict(v.label_fraction)})
    return prepare_task_set(spec, cfg.paths.raw_root / dataset, tasks, work / v.key, ingest, prof.census.raw_rows)


def _stored_cell(path: Path, signature: str) -> dict[str, Any] | None:
    if not (path.exists() and path.with_suffix(".npz").exists()):
        return None
    stored = read_json(path)
    return stored["record"] if stored.get("signature") == signature else None


def _save_cell(path: Path, signature: str, record: dict[str, Any], scores: dict[str, np.ndarray]) -> None:
    with atomic_file(path.with_suffix(".npz")) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **{k: np.asarray(v, dtype=np.float64) for k, v in scores.items()})
    write_json(path, {"signature": signature, "record": record})  # last: the json says the cell is complete


def run_scarce(dataset: str, params: Path | str | None = None, *, config: Path | str | None = None,
               variant: str = "full", workers: int | None = None, only: list[str] | None = None,
               track: bool = True) -> ScarceRun:
    """The scarce-label benchmark of ``dataset`` (params.yaml ``synth.dataset`` or census-income).
    ``config``: the scarce config (default harness/scarce.yaml); ``only``: run just the cells whose key
    contains one of these strings (the report then covers every cell found on disk)."""
    started = time.perf_counter()
    cfg = load_harness_params(params)
    sc = load_scarce_config(config)
    prof = sc.pick(variant)
    cells = plan_cells(dataset, cfg.synth.dataset, prof)
    out_dir = sc.out / dataset / folder_name(variant)
    work = sc.out / dataset / "raw" / folder_name(variant)
    cell_dir = out_dir / "cells"
    n_workers = workers or sc.workers
    recipes = sorted(prof.recipes)
    records: dict[str, dict[str, Any]] = {}
    trained = 0
    failed: dict[str, str] = {}
    with stage_tracker(cfg.tracking, dataset, f"scarce-{variant}", enabled=track,
                       tags={"emm.stage": "benchmark-scarce"}) as tracker:
        tracker.log_params({"dataset": dataset, "variant": variant, "cells": len(cells), "workers": n_workers,
                            "recipes": recipes, "baselines": prof.baselines})
        for v in variants(cells):
            settings = data_settings(cfg, prof, v)
            sigs = {c.key: cell_signature(c, settings, cfg, prof) for c in v.cells}
            for c in v.cells:
                if (rec := _stored_cell(cell_dir / f"{c.key}.json", sigs[c.key])) is not None:
                    records[c.key] = rec
            todo = [c for c in v.cells if c.key not in records and (not only or any(s in c.key for s in only))]
            if not todo:
                continue
            log.info("scarce %s: variant %s, cells %s", dataset, v.key, [c.key for c in todo])
            try:  # one variant's failure (e.g. a fraction leaving val one class) must not lose the others' hours
                data_dir = make_data(dataset, cfg, prof, v, work)
                bprof = BenchmarkProfile(seeds=sorted({c.seed for c in todo}), max_epochs=prof.max_epochs,
                                         baselines=prof.baselines, ablations=["full"], lightgbm=prof.lightgbm,
                                         recipes=prof.recipes)
                jobs = plan_jobs(dataset, cfg, bprof, {v.key: data_dir}, v.key, work)
                results = execute(jobs, {v.key: Schema.load(data_dir).fingerprint()}, n_workers,
                                  child_logger(tracker, v.key))
                synth = synth_config(cfg, prof, v) if v.family == "synth" else None
                for c in todo:
                    record, scores = measure_cell(c, results, data_dir, synth, recipes)
                    _save_cell(cell_dir / f"{c.key}.json", sigs[c.key], record, scores)
                    records[c.key] = record
                    trained += 1
                    log.info("scarce %s: %s done: %s", dataset, c.key,
                             ", ".join(f"{m} {a:.4f}" for m, a in record["aucs"].items()))
            except EMMError as exc:
                log.error("scarce %s: variant %s failed: %s", dataset, v.key, exc)
                failed.update({c.key: str(exc) for c in todo if c.key not in records})
        done = [c for c in cells if c.key in records]
        seconds = time.perf_counter() - started
        files = write_report(dataset, variant, prof, done, [records[c.key] for c in done], cell_dir, out_dir,
                             seconds, failed) if done else []
        for f in files:
            tracker.log_artifact(f, "scarce")
    log.info("scarce %s (%s): %d of %d cells, %d measured now, %.1f min", dataset, variant, len(done), len(cells),
             trained, seconds / 60)
    return ScarceRun(dataset, variant, out_dir, cells, [records[c.key] for c in done], files, seconds, trained,
                     failed)
