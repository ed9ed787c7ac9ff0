"""``emm relatedness``: where fusion pays. The paper says its gains shrink when tasks are weakly related;
this sweep plants the relation and measures it.

At each level ``w`` of ``synth.shared_weight`` (the share of each task's signal that comes from a latent
both tasks see) ``emm synth`` writes a table, a pool is trained on it, decomposed and fused, exactly as
``emm benchmark`` does (the same jobs, cached the same way, so an interrupted sweep resumes). Then, on
the same test rows: the fused model (EMM's default, plus any swept recipe) against its best donor,
its donors' ensemble and stack, and LightGBM, as paired bootstrap CIs; and the oracle's AUC (the true
probabilities, regenerated from the table's seed) as the ceiling no model can pass
(``relatedness_measure``; tables and plot: ``relatedness_report``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from emm.data.options import SynthConfig
from emm.data.schema import Schema
from emm.data.synth import SYNTH_FILE, synthesize
from emm.errors import EMMError
from emm.io import read_json
from emm.pipeline.layout import stage_tracker

from harness.experiments.relatedness_measure import Level, level_key, measure_level
from harness.experiments.relatedness_report import write_report
from harness.experiments.runner import child_logger, execute, plan_jobs
from harness.params import BenchmarkProfile, RelatednessConfig, load_harness_params

log = logging.getLogger(__name__)


@dataclass
class RelatednessRun:
    out_dir: Path
    levels: list[Level]
    files: list[Path]
    seconds: float
    jobs: int


def synth_level(cfg: SynthConfig, data_dir: Path) -> Path:
    """The table of one level, written by ``emm synth`` unless the very same config already wrote it."""
    marker = data_dir / SYNTH_FILE
    if (marker.exists() and (data_dir / "schema.json").exists()
            and read_json(marker).get("config") == cfg.model_dump(mode="json")):
        return data_dir
    synthesize(cfg, data_dir)
    return data_dir


def run_relatedness(params: Path | str | None = None, *, config: Path | str | None = None,
                    shared_weights: list[float] | None = None, rows: int | None = None, seeds: list[int] | None = None,
                    max_epochs: int | None = None, workers: int | None = None, track: bool = True) -> RelatednessRun:
    """The sweep: one synthetic table, pool and fused model(s) per level; report in results/<synth.dataset>/.
    ``params``: emm's params file; ``config``: the harness's (default harness/benchmark.yaml)."""
    started = time.perf_counter()
    cfg = load_harness_params(params, config)
    overrides = {k: v for k, v in {"shared_weights": shared_weights, "rows": rows, "seeds": seeds,
                                   "max_epochs": max_epochs}.items() if v is not None}
    try:
        rc = RelatednessConfig.model_validate({**cfg.benchmark.relatedness.model_dump(mode="json"), **overrides})
    except ValueError as exc:
        raise EMMError(f"emm relatedness: {exc}") from exc
    dataset = cfg.synth.dataset
    out_dir = cfg.benchmark.out / dataset
    work = out_dir / "raw" / "relatedness"
    prof = BenchmarkProfile(seeds=rc.seeds, max_epochs=rc.max_epochs, baselines=[], ablations=["full"],
                            lightgbm=rc.lightgbm, recipes=rc.recipes)
    synth_cfgs = {level_key(w): cfg.synth.model_copy(update={"shared_weight": w, **({"rows": rc.rows} if rc.rows else {})})
                  for w in rc.shared_weights}
    data_dirs = {key: synth_level(sc, work / key / "data") for key, sc in synth_cfgs.items()}
    jobs = [j for key, d in data_dirs.items() for j in plan_jobs(dataset, cfg, prof, {key: d}, key, work)]
    n_workers = workers or cfg.benchmark.workers
    log.info("relatedness sweep: %d levels %s, %d jobs on %d worker(s)", len(data_dirs), rc.shared_weights,
             len(jobs), n_workers)
    with stage_tracker(cfg.tracking, dataset, "relatedness", enabled=track,
                       tags={"emm.stage": "relatedness"}) as tracker:
        tracker.log_params({"shared_weights": rc.shared_weights, "rows": synth_cfgs[level_key(rc.shared_weights[0])].rows,
                            "seeds": rc.seeds, "workers": n_workers, "recipes": sorted(rc.recipes)})
        fingerprints = {key: Schema.load(d).fingerprint() for key, d in data_dirs.items()}
        results = execute(jobs, fingerprints, n_workers, child_logger(tracker, None))
        levels = [lv for w in rc.shared_weights for lv in measure_level(
            results, w, data_dirs[level_key(w)], synth_cfgs[level_key(w)], sorted(rc.recipes))]
        seconds = time.perf_counter() - started
        files = write_report(levels, rc, synth_cfgs[level_key(rc.shared_weights[0])], out_dir, seconds,
                             sum(r.get("wall_seconds", 0) for r in results if not r.get("reused")))
        for lv in levels:
            for d in lv.diffs:
                if not math.isnan(d.diff):
                    tracker.log_metrics({f"{lv.task}_w{lv.shared_weight:.2f}_{d.subject}_minus_{d.against}"
                                         .replace(" ", "_"): d.diff})
        for f in files:
            tracker.log_artifact(f, "relatedness")
    log.info("relatedness sweep done in %.1f min: %s", seconds / 60, out_dir)
    return RelatednessRun(out_dir, levels, files, seconds, len(jobs))
