"""recipes.md: fused-model recipes (other fuse settings on the same pools) against the pool they fuse.

Why a table of its own: choosing the default recipe is a comparison on the same pools and seeds, so
each recipe is shown with its seed spread and its per-seed gap to that seed's best donor (chosen by
validation AUC, so the choice does not look at the test rows), and with a paired bootstrap CI of its
difference to the default recipe on the same test rows and seeds (the only way to tell recipes apart
that differ by less than an unpaired AUC's standard error).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from emm.train.compare import paired_auc_cis

from harness.experiments.paired import CONFIDENCE, EMM, N_RESAMPLES, SEED, Scores, collect, seed_pairs


def _by_seed(results: list[dict[str, Any]], task_set: str, kind: str, method: str | None = None) -> dict:
    return {r["seed"]: r for r in results if r["task_set"] == task_set and r["kind"] == kind
            and (method is None or r["method"] == method)}


def best_donor(results: list[dict[str, Any]], task_set: str, seed: int, task: str) -> tuple[str, float] | None:
    """(name, test AUC) of the seed's pool model for ``task`` with the best validation AUC."""
    donors = [r for r in results if r["task_set"] == task_set and r["kind"] == "pool" and r["seed"] == seed
              and task in r["tasks"]]
    if not donors:
        return None
    best = max(donors, key=lambda r: r["tasks"][task]["val_auc"])
    return best["method"], best["tasks"][task]["test_auc"]


def _cell(values: list[float], sign: bool = False) -> str:
    if not values:
        return "—"
    fmt = "{:+.5f}" if sign else "{:.5f}"
    mean = fmt.format(float(np.mean(values)))
    return f"{mean} ± {float(np.std(values, ddof=1)):.5f}" if len(values) > 1 else mean


def against_default(scores: Scores | None, recipes: list[str]) -> dict[tuple[str, str], str]:
    """``{(recipe, task): "+0.00012 [-0.00003, +0.00027]"}``: the seed-mean AUC(recipe) − AUC(default),
    paired on the same test rows, with its bootstrap CI (empty without stored scores)."""
    out: dict[tuple[str, str], str] = {}
    for i, task in enumerate(scores.tasks if scores else []):
        pairs = {name: found for name in recipes if (found := seed_pairs(scores, task, f"recipe:{name}", EMM))}
        if not pairs:
            continue
        cis = paired_auc_cis(scores.y_test[:, i], pairs, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, seed=SEED)
        out.update({(name, task): f"{ci['diff']:+.5f} [{ci['low']:+.5f}, {ci['high']:+.5f}]" for name, ci in cis.items()})
    return out


def write_recipes(dataset: str, results: list[dict[str, Any]], task_set: str, tasks: list[str],
                  recipes: dict[str, dict[str, Any]], out_dir: Path) -> Path:
    """One row per recipe (and EMM's default, ``full``): test AUC and gap to the best donor, per task."""
    rows = {"default (params.yaml fuse)": _by_seed(results, task_set, "fused", "full")}
    rows.update({name: _by_seed(results, task_set, "recipe", name) for name in recipes})
    paired = against_default(collect(results, task_set, tasks), list(recipes))
    lines = [f"# Fusion recipes, {dataset}", "",
             "Test AUC (mean ± std over seeds); per seed, AUC − that seed's best donor (best by validation "
             "AUC); and AUC − the default recipe's, the mean over the recipe's seeds paired on the same "
             f"seeds and test rows, with its 95% bootstrap CI ({N_RESAMPLES} resamples). Every recipe fuses "
             "the same pool per seed with the same training budget.", "",
             "| recipe | settings | " + " | ".join(f"{t} AUC | {t} − best donor | {t} − default [95% CI]"
                                                  for t in tasks) + " | best epoch | seeds |",
             "|---|---|" + "---:|---:|---:|" * len(tasks) + "---:|---:|"]
    for name, by_seed in rows.items():
        cells = []
        for t in tasks:
            aucs = [r["tasks"][t]["test_auc"] for r in by_seed.values() if t in r["tasks"]]
            gaps = [r["tasks"][t]["test_auc"] - d[1] for s, r in by_seed.items()
                    if t in r["tasks"] and (d := best_donor(results, task_set, s, t)) is not None]
            cells += [_cell(aucs), _cell(gaps, sign=True), paired.get((name, t), "—")]
        epochs = [r.get("best_epoch") for r in by_seed.values() if r.get("best_epoch") is not None]
        settings = json.dumps(recipes.get(name, {}), sort_keys=True).replace("|", "/")
        best = f"{np.mean(epochs):.1f}" if epochs else "—"
        lines.append(f"| {name} | `{settings}` | " + " | ".join(cells) + f" | {best} | {len(by_seed)} |")
    path = Path(out_dir) / "recipes.md"
    path.write_text("\n".join(lines) + "\n")
    return path
