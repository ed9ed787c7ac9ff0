"""One scarce-label cell's measurements, from the per-row scores its jobs stored (``jobs.save_scores``).

Every row of the table is a score on the scarce task's test rows (test keeps every label): EMM with the
default fuse settings and each swept recipe (``cross_residual``), the best donor by validation AUC, the
own-task stack (logistic regression on the task's donors' validation logits), the cross-task stack (on
*every* donor's logits, the rich task's included), the rich task's best donor scored as is, the MTL
baselines, LightGBM and (``emm synth``) the oracle's true probabilities. The stacks are fitted on the
task's *labelled* validation rows only: a missing label is NaN, and ``emm.train.compare`` refuses it.

Why the scores are written per cell (``<cell>.npz``) and not only AUCs: a headline cell runs three seeds,
and its CIs are pooled over them (``paired_auc_cis`` with one pair per seed) once every seed finished, so
each seed's cell keeps its rows. A finished cell is a JSON + npz on disk; a rerun reuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from emm.data.labels import labelled_mask
from emm.data.options import SynthConfig
from emm.data.synth import true_probabilities
from emm.errors import EMMError
from emm.train.compare import stack
from emm.train.metrics import auc

from harness.experiments import paired
from harness.experiments.report import DISPLAY
from harness.experiments.scarce_plan import Cell

EMM = "EMM"
BEST_DONOR, OWN_STACK, CROSS_STACK = "best donor", "own-task stack", "cross-task stack"
ORACLE = "oracle"
TIMED = {"pool": "pool (all members)", "decompose": "decompose", "fused": "fuse (EMM)"}


def recipe_label(name: str) -> str:
    return f"EMM ({name})"


def other_label(other: str) -> str:
    return f"{other} donor alone"


def _labels(data_dir: Path, split: str, task: str) -> np.ndarray:
    """A task's labels as float (NaN = no label): Parquet nulls come back as NaN."""
    col = pq.read_table(data_dir / f"{split}.parquet", columns=[task]).column(task)
    return col.to_numpy(zero_copy_only=False).astype(np.float64)


def _column(result: dict[str, Any], split: str, task: str) -> np.ndarray | None:
    scores = paired._stored(result, split)
    if scores is None or task not in result.get("score_tasks", []):
        return None
    return scores[:, result["score_tasks"].index(task)]


def labelled_counts(data_dir: Path, task: str) -> dict[str, int]:
    """Labelled rows and positives of ``task`` in train and val (what the scarce task had to learn from)."""
    out = {}
    for split in ("train", "val"):
        y = _labels(data_dir, split, task)
        mask = labelled_mask(y)
        out[f"{split}_labelled"], out[f"{split}_positives"] = int(mask.sum()), int(y[mask].sum())
    return out


def measure_cell(cell: Cell, results: list[dict[str, Any]], data_dir: Path, synth: SynthConfig | None,
                 recipes: list[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(the cell's record: AUCs, counts, timings, which donors were picked; its per-row test scores by model,
    plus ``__y__``, the test labels) for ``cell.task`` on seed ``cell.seed``."""
    task, mine = cell.task, [r for r in results if r["seed"] == cell.seed]
    y_all = _labels(data_dir, "test", task)
    test_rows = labelled_mask(y_all)
    y = y_all[test_rows]
    y_val_all = _labels(data_dir, "val", task)
    val_rows = labelled_mask(y_val_all)
    y_val = y_val_all[val_rows]
    if y.min() == y.max() or y_val.size == 0 or y_val.min() == y_val.max():
        raise EMMError(f"scarce cell {cell.key}: task {task!r} has one class (or no row) among its labelled "
                       f"test/val rows in {data_dir}; raise the fraction or the rows (synth.rows, census raw_rows)")
    by_key = {f"{r['kind']}:{r['method']}": r for r in mine}

    def test_of(key: str) -> np.ndarray | None:
        col = _column(by_key[key], "test", task) if key in by_key else None
        return None if col is None else col[test_rows]

    scores: dict[str, np.ndarray] = {}
    for label, key in [(EMM, paired.EMM), *((recipe_label(n), f"recipe:{n}") for n in recipes)]:
        if (s := test_of(key)) is not None:
            scores[label] = s
    donors = {r["method"]: r for r in mine if r["kind"] == "pool"}
    own = sorted(m for m, r in donors.items() if r["score_tasks"] == [task])
    rich = sorted(m for m, r in donors.items() if r["score_tasks"] == [cell.other])
    record: dict[str, Any] = {"best_donor": None, "other_donor": None}
    if own:
        best = max(own, key=lambda m: donors[m]["tasks"][task]["val_auc"])
        record["best_donor"], scores[BEST_DONOR] = best, test_of(f"pool:{best}")

        def logits(names: list[str], split: str, rows: np.ndarray) -> np.ndarray:
            return np.column_stack([paired._stored(donors[m], split)[:, 0][rows] for m in names])
        scores[OWN_STACK] = stack(logits(own, "val", val_rows), y_val, logits(own, "test", test_rows))
        every = own + rich
        scores[CROSS_STACK] = stack(logits(every, "val", val_rows), y_val, logits(every, "test", test_rows))
    if rich:
        pick = max(rich, key=lambda m: donors[m]["tasks"][cell.other]["val_auc"])
        record["other_donor"] = pick
        scores[other_label(cell.other)] = paired._stored(donors[pick], "test")[:, 0][test_rows]
    for r in mine:
        if r["kind"] == "baseline" and (s := test_of(f"baseline:{r['method']}")) is not None:
            scores[DISPLAY.get(r["method"], r["method"])] = s
    if (s := test_of(paired.LIGHTGBM)) is not None:
        scores["LightGBM"] = s
    if synth is not None:
        labels, truth = true_probabilities(synth, "test")
        if not np.array_equal(labels[task].astype(np.float64), y_all):
            raise EMMError(f"scarce cell {cell.key}: the test labels of {task!r} in {data_dir} are not the ones its "
                           f"synth config generates, so the oracle would score other rows; delete {data_dir.parent} "
                           f"and run the benchmark again")
        scores[ORACLE] = truth[task][test_rows]
    record.update(
        cell=cell.key, group=cell.group, seed=cell.seed, task=task, fraction=cell.fraction,
        shared_weight=cell.shared_weight, rare=cell.rare, headline=cell.headline,
        test_rows=int(y.size), test_positives=int(y.sum()), **labelled_counts(data_dir, task),
        aucs={m: auc(y, s) for m, s in scores.items()}, seconds=timings(mine, recipes))
    return record, {**scores, "__y__": y}


def timings(results: list[dict[str, Any]], recipes: list[str]) -> dict[str, float]:
    """Wall seconds of each stage of one seed: the pool (all members), decompose, each fuse, each baseline."""
    out: dict[str, float] = {}
    for r in results:
        kind, method, wall = r["kind"], r["method"], float(r.get("wall_seconds", 0.0))
        if kind == "pool":
            out[TIMED["pool"]] = out.get(TIMED["pool"], 0.0) + wall
        elif kind in ("decompose", "fused") and method in ("pool", "full"):
            out[TIMED[kind]] = wall
        elif kind == "recipe" and method in recipes:
            out[f"fuse ({method})"] = wall
        elif kind in ("baseline", "lightgbm"):
            out[DISPLAY.get(method, method) if kind == "baseline" else "LightGBM"] = wall
    rank = [*TIMED.values(), *(f"fuse ({n})" for n in recipes)]  # the fuse columns first, then the rivals
    return dict(sorted(out.items(), key=lambda kv: rank.index(kv[0]) if kv[0] in rank else len(rank)))
