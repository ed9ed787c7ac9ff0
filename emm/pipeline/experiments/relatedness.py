"""``emm relatedness``: where fusion pays. The paper says its gains shrink when tasks are weakly related;
this sweep plants the relation and measures it.

At each level ``w`` of ``synth.shared_weight`` (the share of each task's signal that comes from a latent
both tasks see) ``emm synth`` writes a table, a pool is trained on it, decomposed and fused, exactly as
``emm benchmark`` does (the same jobs, cached the same way, so an interrupted sweep resumes). Then, on
the same test rows: the fused model (EMM's default, plus any swept recipe) against its best donor,
its donors' ensemble and stack, and LightGBM, as paired bootstrap CIs; and the oracle's AUC (the true
probabilities, regenerated from the table's seed) as the ceiling no model can pass.

Why the oracle on the test rows themselves, not synth.json's calibration sample: the gap "oracle − model"
is then a paired quantity on one set of rows, like every other number here.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emm.data.options import SynthConfig
from emm.data.schema import Schema
from emm.data.synth import SYNTH_FILE, synthesize, true_probabilities
from emm.errors import EMMError
from emm.io import read_json
from emm.pipeline.experiments import paired
from emm.pipeline.experiments.runner import child_logger, execute, plan_jobs
from emm.pipeline.layout import stage_tracker
from emm.pipeline.params import BenchmarkProfile, RelatednessConfig, load_params
from emm.train.compare import paired_auc_cis
from emm.train.metrics import auc

log = logging.getLogger(__name__)
EMM_LABEL = "EMM"
BARS = ("best donor", "donor ensemble", "donor stack", "LightGBM")  # what each fused model is paired with
BAR_KEYS = {"donor ensemble": "donors:ensemble", "donor stack": "donors:stack", "LightGBM": paired.LIGHTGBM}


def level_key(shared_weight: float) -> str:
    """Folder and task-set name of one relatedness level: ``w-0.30``."""
    return f"w-{shared_weight:.2f}"


@dataclass
class Diff:
    subject: str   # EMM or a recipe name
    against: str   # one of BARS
    diff: float    # mean over seeds of AUC(subject) − AUC(against)
    low: float
    high: float
    seed_std: float


@dataclass
class Level:
    """One relatedness level and task: every model's test AUC per seed and the paired differences."""

    shared_weight: float
    task: str
    oracle: float                      # AUC of the true probabilities on the same test rows
    relation_auc: float                # click's true probability as a score for conversion (synth.json)
    positives: int                     # positive test rows: what bounds the CI widths
    aucs: dict[str, list[float]] = field(default_factory=dict)
    diffs: list[Diff] = field(default_factory=list)
    best_epochs: dict[str, list[int]] = field(default_factory=dict)


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


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def measure_level(results: list[dict[str, Any]], key: str, shared_weight: float, data_dir: Path,
                  synth_cfg: SynthConfig, recipes: list[str]) -> list[Level]:
    """The AUCs and paired CIs of one level, one ``Level`` per task."""
    schema = Schema.load(data_dir)
    tasks = schema.task_names
    scores = paired.collect(results, key, tasks)
    if scores is None:
        raise EMMError(f"relatedness level {key}: no job stored test scores in {data_dir.parent}; delete that "
                       f"folder and run `emm relatedness` again")
    labels, truth = true_probabilities(synth_cfg, "test")
    record = read_json(data_dir / SYNTH_FILE)
    subjects = {EMM_LABEL: paired.EMM, **{name: f"recipe:{name}" for name in recipes}}
    levels = []
    for i, task in enumerate(tasks):
        y = scores.y_test[:, i]
        if not np.array_equal(labels[task].astype(y.dtype), y):
            raise EMMError(f"{data_dir}: the test labels of {task!r} are not the ones its {SYNTH_FILE} config "
                           f"generates, so the oracle would score other rows; delete {data_dir.parent} and rerun")
        bars = {"best donor": paired.best_key(scores, task, "pool:"), **BAR_KEYS}
        seeds = sorted(scores.test)
        models = {**subjects, **bars}
        level = Level(shared_weight, task, auc(y, truth[task]), float(record["click_probability_auc_on_conversion"]),
                      int(y.sum()))
        level.aucs = {label: got for label, k in models.items() if k is not None and (got := [
            auc(y, scores.test[s][task][k]) for s in seeds if k in scores.test[s].get(task, {})])}
        pairs = {}
        for subject, s_key in subjects.items():
            for bar, b_key in bars.items():
                got = [(scores.test[s][task][s_key], scores.test[s][task][b_key]) for s in seeds
                       if b_key is not None and {s_key, b_key} <= set(scores.test[s].get(task, {}))]
                if got:
                    pairs[(subject, bar)] = got
        cis = paired_auc_cis(y, {f"{a}|{b}": p for (a, b), p in pairs.items()}, n_resamples=paired.N_RESAMPLES,
                             confidence=paired.CONFIDENCE, seed=paired.SEED) if pairs else {}
        for (subject, bar), got in pairs.items():
            ci = cis[f"{subject}|{bar}"]
            level.diffs.append(Diff(subject, bar, ci["diff"], ci["low"], ci["high"],
                                    _std([auc(y, a) - auc(y, b) for a, b in got])))
        for subject, s_key in subjects.items():
            kind, method = s_key.split(":", 1)
            level.best_epochs[subject] = [r["best_epoch"] for r in results if r["task_set"] == key
                                          and r["kind"] == kind and r["method"] == method]
        levels.append(level)
    return levels


def run_relatedness(params: Path | str | None = None, *, shared_weights: list[float] | None = None,
                    rows: int | None = None, seeds: list[int] | None = None, max_epochs: int | None = None,
                    workers: int | None = None, track: bool = True) -> RelatednessRun:
    """The sweep: one synthetic table, pool and fused model(s) per level; report in results/<synth.dataset>/."""
    from emm.pipeline.experiments.relatedness_report import write_report  # the plot pulls in matplotlib

    started = time.perf_counter()
    cfg = load_params(params)
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
            results, level_key(w), w, data_dirs[level_key(w)], synth_cfgs[level_key(w)], sorted(rc.recipes))]
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
