"""Table I's row-level comparisons: the donor baselines (the mean of the donors' logits, and a logistic
regression stacked on their validation logits) and paired bootstrap CIs of EMM against the bars it
must clear, all from the per-row test scores the jobs store (``jobs.save_scores``).

Why here and not in the result jsons: a donor baseline or a paired CI needs several jobs' rows at once
(every donor of a seed, EMM and its rival of the same seed), so it can only be computed once they all
finished. Results without stored scores (LightGBM, whose runner returns AUCs only) get no CI.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from emm.train.compare import ensemble_logits, paired_auc_cis, stack
from emm.train.metrics import auc

ENSEMBLE, STACK = "donor ensemble (mean of logits)", "donor stack (logistic regression on validation logits)"
EMM = "fused:full"
N_RESAMPLES, CONFIDENCE, SEED = 1000, 0.95, 0


@dataclass
class Scores:
    """One task set's per-row scores. ``test[seed][task][key]`` are test-row scores [n] for the model
    ``key`` = ``kind:method`` (``donors:ensemble`` / ``donors:stack`` are built here); ``val_auc[task][key]``
    the validation AUC of each seed, which is what "best" is chosen by."""

    tasks: list[str]
    y_test: np.ndarray
    test: dict[int, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    val_auc: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def _labels(data_dir: str, split: str, tasks: list[str]) -> np.ndarray:
    return pq.read_table(Path(data_dir) / f"{split}.parquet", columns=tasks).to_pandas()[tasks].to_numpy()


def _stored(result: dict[str, Any], split: str) -> np.ndarray | None:
    path = (result.get("scores") or {}).get(split)
    return np.load(path) if path and Path(path).exists() else None


def collect(results: list[dict[str, Any]], task_set: str, tasks: list[str]) -> Scores | None:
    """Every stored test score of ``task_set`` plus, per seed and task, the donor ensemble and stack;
    None when nothing of this task set stored scores (results from before scores were kept)."""
    scored = [r for r in results if r["task_set"] == task_set and _stored(r, "test") is not None]
    if not scored:
        return None
    data_dirs = {r["data_dir"] for r in scored}
    if len(data_dirs) != 1:  # the pairing is row by row: every score must be on the same test split
        raise ValueError(f"task set {task_set}: scores come from several data folders {sorted(data_dirs)}")
    data_dir = data_dirs.pop()
    out = Scores(tasks, _labels(data_dir, "test", tasks))
    y_val = _labels(data_dir, "val", tasks)
    donors_val: dict[int, dict[str, dict[str, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))
    for r in scored:
        test, key = _stored(r, "test"), f"{r['kind']}:{r['method']}"
        for j, task in enumerate(r["score_tasks"]):
            out.test.setdefault(r["seed"], {}).setdefault(task, {})[key] = test[:, j]
            out.val_auc.setdefault(task, {}).setdefault(key, []).append(float(r["tasks"][task]["val_auc"]))
        if r["kind"] == "pool":
            donors_val[r["seed"]][r["score_tasks"][0]][key] = _stored(r, "val")[:, 0]
    for seed, by_task in out.test.items():
        for task, models in by_task.items():
            donors = sorted(k for k in models if k.startswith("pool:"))  # one column order for val and test
            if not donors:
                continue
            x_test = np.column_stack([models[k] for k in donors])
            x_val = np.column_stack([donors_val[seed][task][k] for k in donors])
            models["donors:ensemble"] = ensemble_logits(x_test)
            models["donors:stack"] = stack(x_val, y_val[:, tasks.index(task)], x_test)
    return out


def donor_aucs(scores: Scores | None) -> dict[str, dict[str, list[float]]]:
    """{ENSEMBLE / STACK: {task: test AUC per seed}} (empty without stored scores)."""
    out: dict[str, dict[str, list[float]]] = {ENSEMBLE: defaultdict(list), STACK: defaultdict(list)}
    for seed in sorted(scores.test if scores else {}):
        for task, models in scores.test[seed].items():
            i = scores.tasks.index(task)
            for name, key in ((ENSEMBLE, "donors:ensemble"), (STACK, "donors:stack")):
                if key in models:
                    out[name][task].append(auc(scores.y_test[:, i], models[key]))
    return out


@dataclass
class PairedRow:
    comparison: str      # e.g. "best donor by validation AUC"
    task: str
    against: str         # the model key EMM is compared with
    diff: float          # mean over seeds of AUC(EMM) − AUC(against), seed-matched
    low: float
    high: float
    seed_std: float      # sample std over seeds of the per-seed difference
    seeds: int
    n_resamples: int


def _best(scores: Scores, task: str, prefix: str) -> str | None:
    """The ``prefix`` model with the best mean validation AUC for ``task`` among those with test scores."""
    have = {k for by_task in scores.test.values() for k in by_task.get(task, {})}
    candidates = {k: np.mean(v) for k, v in scores.val_auc.get(task, {}).items() if k.startswith(prefix) and k in have}
    return max(candidates, key=candidates.get) if candidates else None


def paired_rows(scores: Scores | None) -> list[PairedRow]:
    """EMM − best donor, − donor ensemble, − donor stack, − LightGBM, − best baseline, per task."""
    if scores is None:
        return []
    rows = []
    for i, task in enumerate(scores.tasks):
        wanted = {"best donor by validation AUC": _best(scores, task, "pool:"),
                  "donor ensemble": "donors:ensemble", "donor stack": "donors:stack", "LightGBM": "lightgbm:lightgbm",
                  "best baseline by validation AUC": _best(scores, task, "baseline:")}
        pairs: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for label, key in wanted.items():
            seeds = [s for s, by_task in sorted(scores.test.items())
                     if key is not None and EMM in by_task.get(task, {}) and key in by_task[task]]
            if seeds:
                pairs[label] = [(scores.test[s][task][EMM], scores.test[s][task][key]) for s in seeds]
        if not pairs:
            continue
        y = scores.y_test[:, i]
        cis = paired_auc_cis(y, pairs, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, seed=SEED)
        for label, ci in cis.items():
            per_seed = [auc(y, a) - auc(y, b) for a, b in pairs[label]]
            rows.append(PairedRow(label, task, wanted[label], ci["diff"], ci["low"], ci["high"],
                                  float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0, len(per_seed),
                                  ci["n_resamples"]))
    return rows


def _name(key: str, display: Mapping[str, str]) -> str:
    """The model's table name; empty for the donor baselines, whose comparison already names them."""
    kind, method = key.split(":", 1)
    return "" if kind == "donors" else display.get(method, method)


def ci_section(rows: list[PairedRow], tasks: list[str], display: Mapping[str, str]) -> list[str]:
    """Markdown: one line per comparison, per task the difference, its 95% CI and the seed spread."""
    if not rows:
        return ["## EMM against the bars it must clear", "",
                "No per-row test scores were stored for this run, so there are no paired CIs "
                "(rerun the benchmark: runs from before scores were kept are trained again).", ""]
    lines = ["## EMM against the bars it must clear: paired 95% CIs", "",
             "AUC(EMM) − AUC(model) on the same test rows, seed-matched (each seed's EMM against the same seed's "
             "model). **diff** is the mean over seeds of the per-seed difference; **95% CI** is the percentile "
             f"bootstrap ({N_RESAMPLES} resamples) of that mean, resampling test rows jointly for every seed and "
             "model; **seed std** is the sample std of the per-seed difference. Why one CI over the pooled seeds "
             "rather than the first seed's: it is the interval of exactly the number shown and uses every seed. "
             "The bootstrap covers test-row noise only, not training randomness, which the seed std shows. "
             "\"Best\" donor and baseline are chosen by mean validation AUC, never by test AUC."
             + ("" if any(r.comparison == "LightGBM" for r in rows) else
                " LightGBM has no CI: its runner returns AUCs, not per-row scores."), "",
             "| EMM − | " + " | ".join(f"{t} diff [95% CI] | {t} seed std | {t} vs" for t in tasks) + " |",
             "|---|" + "---:|---:|---|" * len(tasks)]
    by = {(r.comparison, r.task): r for r in rows}
    for label in dict.fromkeys(r.comparison for r in rows):
        cells = []
        for t in tasks:
            r = by.get((label, t))
            cells += (["—", "", ""] if r is None else
                      [f"{r.diff:+.5f} [{r.low:+.5f}, {r.high:+.5f}]", f"{r.seed_std:.5f}", _name(r.against, display)])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def ci_verdict(rows: list[PairedRow], display: Mapping[str, str]) -> list[str]:
    """One sentence per comparison: above, below, or not distinguishable at 95%."""
    out = []
    for r in rows:
        word = "above it" if r.low > 0 else "below it" if r.high < 0 else "not distinguishable at 95%"
        name = _name(r.against, display)
        out.append(f"- {r.task}: EMM − {r.comparison}{f' ({name})' if name else ''} = {r.diff:+.5f}, "
                   f"95% CI [{r.low:+.5f}, {r.high:+.5f}]: {word}.")
    return out


def csv_rows(rows: list[PairedRow], display: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"model": f"EMM − {r.comparison}", "kind": "paired_ci", "task": r.task, "seeds": r.seeds,
             "against": _name(r.against, display), "diff": f"{r.diff:.6f}", "ci_low": f"{r.low:.6f}",
             "ci_high": f"{r.high:.6f}", "diff_seed_std": f"{r.seed_std:.6f}", "n_resamples": r.n_resamples}
            for r in rows if not math.isnan(r.diff)]
