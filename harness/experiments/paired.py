"""Table I's row-level comparisons: the donor baselines (the mean of the donors' logits, and a logistic
regression stacked on their validation logits), the hybrids (EMM, or the donors, stacked with one LightGBM
per task) and paired bootstrap CIs of EMM and of the hybrid against the bars they must clear, all from the
per-row scores the jobs store (``jobs.save_scores``).

Why here and not in the result jsons: a donor baseline or a paired CI needs several jobs' rows at once
(every donor of a seed, EMM and its rival of the same seed), so it can only be computed once they all
finished. Results without stored scores (runs from before scores were kept) get no CI; the hybrids also
need validation scores, which EMM and LightGBM jobs store.
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

from harness.experiments.members import NETWORKS_EMM, is_tree_result

ENSEMBLE, STACK = "donor ensemble (mean of logits)", "donor stack (logistic regression on validation logits)"
HYBRID = "hybrid: EMM + LightGBM (stack on validation scores)"
DONOR_HYBRID = "hybrid: donors + LightGBM (stack on validation scores)"
EMM, LIGHTGBM = "fused:full", "lightgbm:lightgbm"
NETWORKS = f"fused:{NETWORKS_EMM}"  # EMM on the pool's networks alone, run when the pool has tree members
TREE_EMM = "EMM with tree donors"  # EMM's name in Table I when its pool has tree members (they join at the output)
HYBRID_KEY, DONOR_HYBRID_KEY = "hybrid:emm+lightgbm", "hybrid:donors+lightgbm"
BUILT = {ENSEMBLE: "donors:ensemble", STACK: "donors:stack", HYBRID: HYBRID_KEY, DONOR_HYBRID: DONOR_HYBRID_KEY}
N_RESAMPLES, CONFIDENCE, SEED = 1000, 0.95, 0


@dataclass
class Scores:
    """One task set's per-row scores. ``test[seed][task][key]`` are test-row scores [n] for the model
    ``key`` = ``kind:method`` (``donors:ensemble`` / ``donors:stack`` are built here); ``val_auc[task][key]``
    the validation AUC of each seed, which is what "best" is chosen by; ``trees``: the keys of the pool's tree
    members (LightGBM, joining EMM at the output), donors like the networks."""

    tasks: list[str]
    y_test: np.ndarray
    test: dict[int, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    val_auc: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    trees: set[str] = field(default_factory=set)

    @property
    def emm_name(self) -> str:
        """What EMM is called in the comparisons: the fused whole pool is "EMM with tree donors" when it has any."""
        return TREE_EMM if self.trees else "EMM"


def _labels(data_dir: str, split: str, tasks: list[str]) -> np.ndarray:
    return pq.read_table(Path(data_dir) / f"{split}.parquet", columns=tasks).to_pandas()[tasks].to_numpy()


def _stored(result: dict[str, Any], split: str) -> np.ndarray | None:
    path = (result.get("scores") or {}).get(split)
    return np.load(path) if path and Path(path).exists() else None


def _as_logit(result: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    """Logits for a stack: probabilities are mapped back (clipped: a float32 sigmoid can round to 1)."""
    if result.get("score_kind") == "logit":
        return scores.astype(np.float64)
    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


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
    val: dict[int, dict[str, dict[str, np.ndarray]]] = defaultdict(lambda: defaultdict(dict))  # logits
    for r in scored:
        test, key = _stored(r, "test"), f"{r['kind']}:{r['method']}"
        if is_tree_result(r):
            out.trees.add(key)
        val_scores = _stored(r, "val")
        for j, task in enumerate(r["score_tasks"]):
            out.test.setdefault(r["seed"], {}).setdefault(task, {})[key] = test[:, j]
            out.val_auc.setdefault(task, {}).setdefault(key, []).append(float(r["tasks"][task]["val_auc"]))
            if val_scores is not None:
                val[r["seed"]][task][key] = _as_logit(r, val_scores[:, j])
    lightgbm = {r["seed"]: r for r in scored if r["kind"] == "lightgbm"}
    emm = {r["seed"]: r for r in scored if f"{r['kind']}:{r['method']}" == EMM}
    for seed, by_task in out.test.items():
        for task, models in by_task.items():
            y = y_val[:, tasks.index(task)]
            donors = sorted(k for k in models if k.startswith("pool:"))  # one column order for val and test
            if donors:
                x_test = np.column_stack([models[k] for k in donors])
                x_val = np.column_stack([val[seed][task][k] for k in donors])
                models["donors:ensemble"] = ensemble_logits(x_test)
                models["donors:stack"] = stack(x_val, y, x_test)
            if LIGHTGBM not in val[seed][task]:
                continue  # LightGBM off, or a result from before its validation scores were kept
            gbm_test = _as_logit(lightgbm[seed], models[LIGHTGBM])
            if EMM in val[seed][task]:
                models[HYBRID_KEY] = stack(np.column_stack([val[seed][task][EMM], val[seed][task][LIGHTGBM]]), y,
                                           np.column_stack([_as_logit(emm[seed], models[EMM]), gbm_test]))
            if donors:
                models[DONOR_HYBRID_KEY] = stack(np.column_stack([x_val, val[seed][task][LIGHTGBM]]), y,
                                                 np.column_stack([x_test, gbm_test]))
    return out


def donor_aucs(scores: Scores | None) -> dict[str, dict[str, list[float]]]:
    """{ENSEMBLE / STACK / HYBRID / DONOR_HYBRID: {task: test AUC per seed}} (empty without stored scores)."""
    out: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in BUILT}
    for seed in sorted(scores.test if scores else {}):
        for task, models in scores.test[seed].items():
            i = scores.tasks.index(task)
            for name, key in BUILT.items():
                if key in models:
                    out[name][task].append(auc(scores.y_test[:, i], models[key]))
    return out


@dataclass
class PairedRow:
    title: str           # how the comparison reads: "EMM − donor stack", "EMM with tree donors − LightGBM", ...
    comparison: str      # e.g. "best donor by validation AUC"
    subject: str         # the model key on the left of the difference: EMM, or the hybrid
    task: str
    against: str         # the model key EMM is compared with
    diff: float          # mean over seeds of AUC(EMM) − AUC(against), seed-matched
    low: float
    high: float
    seed_std: float      # sample std over seeds of the per-seed difference
    seeds: int
    n_resamples: int


def best_key(scores: Scores, task: str, prefix: str) -> str | None:
    """The ``prefix`` model with the best mean validation AUC for ``task`` among those with test scores."""
    have = {k for by_task in scores.test.values() for k in by_task.get(task, {})}
    candidates = {k: np.mean(v) for k, v in scores.val_auc.get(task, {}).items() if k.startswith(prefix) and k in have}
    return max(candidates, key=candidates.get) if candidates else None


def seed_pairs(scores: Scores, task: str, subject: str, against: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(subject, against)`` test scores of ``task``, one pair per seed that has both (seed-matched), in
    seed order: what ``paired_auc_cis`` takes for a seed-mean difference."""
    return [(by_task[task][subject], by_task[task][against]) for _, by_task in sorted(scores.test.items())
            if subject in by_task.get(task, {}) and against in by_task[task]]


def paired_rows(scores: Scores | None) -> list[PairedRow]:
    """EMM − best donor, − donor ensemble, − donor stack, − LightGBM, − best baseline, − EMM on the networks
    alone (a pool with tree members), per task; and the hybrid (EMM + LightGBM) − LightGBM and − the donors'
    hybrid (donors + LightGBM). The best donor is chosen among every pool member, tree members included."""
    if scores is None:
        return []
    rows = []
    for i, task in enumerate(scores.tasks):
        wanted = {"best donor by validation AUC": (EMM, best_key(scores, task, "pool:")),
                  "donor ensemble": (EMM, "donors:ensemble"), "donor stack": (EMM, "donors:stack"),
                  "LightGBM": (EMM, LIGHTGBM),
                  "best baseline by validation AUC": (EMM, best_key(scores, task, "baseline:")),
                  "EMM networks only": (EMM, NETWORKS),
                  "hybrid − LightGBM": (HYBRID_KEY, LIGHTGBM),
                  "hybrid − donors' hybrid": (HYBRID_KEY, DONOR_HYBRID_KEY)}
        pairs = {label: found for label, (subject, key) in wanted.items()
                 if key is not None and (found := seed_pairs(scores, task, subject, key))}
        if not pairs:
            continue
        y = scores.y_test[:, i]
        cis = paired_auc_cis(y, pairs, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, seed=SEED)
        for label, ci in cis.items():
            per_seed = [auc(y, a) - auc(y, b) for a, b in pairs[label]]
            subject, against = wanted[label]
            title = f"{scores.emm_name} − {label}" if subject == EMM else label
            rows.append(PairedRow(title, label, subject, task, against, ci["diff"], ci["low"], ci["high"],
                                  float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0, len(per_seed),
                                  ci["n_resamples"]))
    return rows


def _name(key: str, display: Mapping[str, str]) -> str:
    """The model's table name; empty for the donor baselines, whose comparison already names them."""
    kind, method = key.split(":", 1)
    return "" if kind in ("donors", "hybrid") else display.get(method, method)


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
             + (f" EMM here is **{TREE_EMM}**: the whole pool fused, each tree member joining its task's blend at "
                "the output; the best donor is chosen among the networks and the tree members alike (`vs` names "
                "it), and \"EMM networks only\" is the same recipe fused on the pool's networks alone."
                if any(r.title.startswith(TREE_EMM) for r in rows) else "")
             + ("" if any(r.comparison == "LightGBM" for r in rows) else
                " LightGBM has no CI: it was not run in this profile, or its per-row scores were not stored."), "",
             "The hybrid rows compare EMM stacked with LightGBM (a logistic regression on both validation scores) "
             "against LightGBM alone and against the donors stacked with LightGBM: does the fused model add "
             "anything a tree model lacks, beyond what its donors add?", "",
             "| comparison | " + " | ".join(f"{t} diff [95% CI] | {t} seed std | {t} vs" for t in tasks) + " |",
             "|---|" + "---:|---:|---|" * len(tasks)]
    by = {(r.comparison, r.task): r for r in rows}
    for label in dict.fromkeys(r.comparison for r in rows):
        cells = []
        for t in tasks:
            r = by.get((label, t))
            cells += (["—", "", ""] if r is None else
                      [f"{r.diff:+.5f} [{r.low:+.5f}, {r.high:+.5f}]", f"{r.seed_std:.5f}" if r.seeds > 1 else "— (1 seed)",
                       _name(r.against, display)])
        title = next(r for r in rows if r.comparison == label).title
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return lines + [""]


def ci_verdict(rows: list[PairedRow], display: Mapping[str, str]) -> list[str]:
    """One sentence per comparison: above, below, or not distinguishable at 95%."""
    out = []
    for r in rows:
        word = "above it" if r.low > 0 else "below it" if r.high < 0 else "not distinguishable at 95%"
        name = _name(r.against, display)
        out.append(f"- {r.task}: {r.title}{f' ({name})' if name else ''} = {r.diff:+.5f}, "
                   f"95% CI [{r.low:+.5f}, {r.high:+.5f}]: {word}.")
    return out


def csv_rows(rows: list[PairedRow], display: Mapping[str, str]) -> list[dict[str, Any]]:
    return [{"model": r.title, "kind": "paired_ci", "task": r.task, "seeds": r.seeds,
             "against": _name(r.against, display), "diff": f"{r.diff:.6f}", "ci_low": f"{r.low:.6f}",
             "ci_high": f"{r.high:.6f}", "diff_seed_std": f"{r.seed_std:.6f}", "n_resamples": r.n_resamples}
            for r in rows if not math.isnan(r.diff)]


def mean_text(values: list[float], digits: int = 5) -> str:
    """An AUC over seeds as the tables print it: the mean, ± the seed standard deviation when there are
    several seeds, an em dash when the model did not run. One formatter for every report's tables."""
    if not values:
        return "—"
    spread = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{np.mean(values):.{digits}f}{spread}"


def diff_text(diffs: list[Any], subject: str, against: str, digits: int = 5) -> str:
    """``subject − against`` with its paired 95% CI and a verdict word (**above** when the CI is above 0,
    below when it is below, ≈ when it covers 0), from any record with ``subject, against, diff, low,
    high``; an em dash when the pair was not compared."""
    d = next((d for d in diffs if d.subject == subject and d.against == against), None)
    if d is None:
        return "—"
    word = "**above**" if d.low > 0 else "below" if d.high < 0 else "≈"
    return f"{d.diff:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}] {word}"
