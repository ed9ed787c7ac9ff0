"""The relatedness sweep's measurements: per level and task, every model's test AUC, the paired CIs of each
fused model against the bars it must clear, and the oracle's AUC on the same test rows.

Why the oracle on the test rows themselves, not synth.json's calibration sample: the gap "oracle − model"
is then a paired quantity on one set of rows, like every other number here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emm.data.options import SynthConfig
from emm.data.schema import Schema
from emm.data.synth import SYNTH_FILE, true_probabilities
from emm.errors import EMMError
from emm.io import read_json
from emm.train.compare import paired_auc_cis
from emm.train.metrics import auc

from harness.experiments import paired

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


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def measure_level(results: list[dict[str, Any]], shared_weight: float, data_dir: Path, synth_cfg: SynthConfig,
                  recipes: list[str]) -> list[Level]:
    """The AUCs and paired CIs of one level, one ``Level`` per task."""
    key = level_key(shared_weight)
    schema = Schema.load(data_dir)
    tasks = schema.task_names
    scores = paired.collect(results, key, tasks)
    if scores is None:
        raise EMMError(f"relatedness level {key}: no job stored test scores in {data_dir.parent}; delete that "
                       f"folder and run `emm relatedness` again")
    labels, truth = true_probabilities(synth_cfg, "test")
    record = read_json(data_dir / SYNTH_FILE)
    subjects = {EMM_LABEL: paired.EMM, **{name: f"recipe:{name}" for name in recipes}}
    seeds = sorted(scores.test)
    levels = []
    for i, task in enumerate(tasks):
        y = scores.y_test[:, i]
        if not np.array_equal(labels[task].astype(y.dtype), y):
            raise EMMError(f"{data_dir}: the test labels of {task!r} are not the ones its {SYNTH_FILE} config "
                           f"generates, so the oracle would score other rows; delete {data_dir.parent} and rerun")
        bars = {"best donor": paired.best_key(scores, task, "pool:"), **BAR_KEYS}
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


