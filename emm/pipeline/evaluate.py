"""Stage 5, ``evaluate``: score the saved fused model on the test split and compare it with its pool.

Gain is the paper's: the fused model's test AUC minus the mean test AUC of that task's single-task
models (also given relative, in %). We also report the gap to the *best* donor, a stricter bar.

What a pool gives for free is a stricter bar still: the mean of the donors' logits (``donor_ensemble``)
and a logistic regression on them fitted on validation rows (``donor_stack``). Every "fused beats X"
comes with a paired 95% bootstrap CI on the same test rows (``ci``), since one AUC's sampling error is
several times larger than that of a difference measured on shared rows (``emm.train.compare``). The
best donor in ``ci`` is chosen by *validation* AUC, so choosing it does not peek at the test rows it
is then compared on (``pool_best_auc``, kept as it was, is the best by test AUC).

Every number of a task is computed on that task's labelled rows (``task_masks``: a label may be missing):
its AUCs, the ensemble and every CI on its labelled test rows (test keeps all its labels), the stack
fitted on its labelled validation rows. The summary leads with what fusion added over the donor stack
(``fused_minus_stack``, its CI and a plain verdict, ``emm.pipeline.register``), since a large Gain over
the pool mean says little about fusion when the free stack of the same donors gets most of it.

What the model costs to score (``cost``: FLOPs per row and parameters, ``emm.train.cost``) is counted here on the
loaded model, the one registered, beside what it cost as trained and what the fuse stage pruned from it
(``fused.json``'s ``cost`` and ``pruned``, ``emm.fusion.prune``).

Every donor AUC reported is scored here, on the rows the fused model is scored on (``donor_scores``),
never read from pool.json: a stored number describes whatever the file says, a scored one the model that
was loaded. The pool is loaded through its checks (``emm.models.pool.load_pool``; against the params'
pool when run as a stage), and the fused model must have been fused from this pool (``fused.json``'s
``made_from``), else the comparison would be with donors it never had.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emm.data.labels import require_labelled
from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split
from emm.errors import EMMError
from emm.fusion.saved import load_fused
from emm.io import atomic_dir, write_json
from emm.models.pool import PoolEntry, load_pool
from emm.pipeline.decompose import fused_pool, stage_pool_signatures
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import TrackingConfig, load_params
from emm.pipeline.register import GAIN, LOSS, NO_GAIN, STACK_KEY, fused_minus_stack, register_fused
from emm.train.compare import ensemble_logits, paired_auc_cis, stack
from emm.train.cost import model_cost
from emm.train.metrics import auc, check_scores, logloss, mean_auc
from emm.train.predict import predict_logits, predict_proba

log = logging.getLogger(__name__)
CI_RESAMPLES, CI_CONFIDENCE, CI_SEED = 1000, 0.95, 0  # one fixed seed: rerunning evaluate gives the same CIs
COST_ROWS = 1024  # test rows the FLOPs per row are counted on


def task_masks(schema: Schema, val: SplitTensors, test: SplitTensors) -> dict[str, dict[str, np.ndarray]]:
    """{task: {"val": mask, "test": mask}}: the rows labelled for each task, on which every number of that
    task is computed (test: all its labels; val: the rows its donor stack is fitted on). An EMMError names
    the task and split when they hold no label or one class only (no AUC, no stack, no CI there)."""
    return {task: {"val": require_labelled(val.labels[:, i], task, "val", "evaluate: the donor stack's fit"),
                   "test": require_labelled(test.labels[:, i], task, "test", "evaluate")}
            for i, task in enumerate(schema.task_names)}


def fused_metrics(probs: np.ndarray, test: SplitTensors, masks: dict[str, dict[str, np.ndarray]], *,
                  what: str) -> dict[str, dict[str, float]]:
    """{task: {auc, logloss, labelled}} of the fused model on each task's labelled test rows. Every row's
    score is checked finite first, labelled or not: a model broken on some rows is broken."""
    check_scores(probs, what=what)
    out = {}
    for i, task in enumerate(test.task_names):
        m = masks[task]["test"]
        y, p = test.labels[:, i].numpy()[m], probs[m, i]
        out[task] = {"auc": auc(y, p, what=what, task=task), "logloss": logloss(y, p), "labelled": int(m.sum())}
    return out


def compare_with_pool(test: dict[str, dict[str, float]], donors_by_task: dict[str, dict[str, Any]]
                      ) -> dict[str, dict[str, Any]]:
    """Per task: the fused model's test AUC against its donors' (as ``donor_scores`` scored them): Gain."""
    out = {}
    for task, m in test.items():
        donors = dict(zip(donors_by_task[task]["names"], donors_by_task[task]["test_auc"]))
        mean, best = float(np.mean(list(donors.values()))), max(donors.values())
        out[task] = {"auc": m["auc"], "logloss": m["logloss"], "pool": donors, "pool_mean_auc": mean,
                     "pool_best_auc": best, "gain": m["auc"] - mean, "gain_pct": 100 * (m["auc"] - mean) / mean,
                     "vs_best_donor": m["auc"] - best}
        if "labelled" in m:
            out[task]["labelled_test_rows"] = m["labelled"]
    return out


def donor_scores(pool: list[tuple[PoolEntry, nn.Module]], schema: Schema, val: SplitTensors,
                 test: SplitTensors, masks: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """{task: {names, val_auc, test_auc, val_logits [n_val, k], test_logits [n_test, k], test_probs}}, every
    AUC scored here on these rows, and the logits and probabilities kept of the task's labelled rows only
    (``masks``): everything downstream of a task (stack, ensemble, CIs) sees the same rows.

    Logits, not probabilities, feed the ensemble and the stack (float32 sigmoids of confident rows are
    all 1.0); a single donor is scored through ``sigmoid(logit)`` in float32, the way every AUC in
    EMM (pool.json's, the fused model's) is computed.
    """
    out: dict[str, dict[str, Any]] = {}
    for entry, model in pool:
        row = out.setdefault(entry.task, {"names": [], "val_auc": [], "test_auc": [], "val_logits": [],
                                          "test_logits": []})
        i = schema.task_names.index(entry.task)
        what = f"pool model {entry.name!r}"
        for split, data in (("val", val), ("test", test)):
            logits = check_scores(predict_logits(model, data)[:, 0], what=what, task=entry.task)
            m = masks[entry.task][split]
            probs = torch.sigmoid(torch.from_numpy(logits[m])).numpy()
            row[f"{split}_logits"].append(logits[m])
            row[f"{split}_auc"].append(auc(data.labels[:, i].numpy()[m], probs, what=what, task=entry.task))
        row["names"].append(entry.name)
    for row in out.values():
        row["val_logits"], row["test_logits"] = np.column_stack(row["val_logits"]), np.column_stack(row["test_logits"])
        row["test_probs"] = torch.sigmoid(torch.from_numpy(row["test_logits"])).numpy()
    return out


def donor_baselines(per_task: dict[str, dict[str, Any]], donors: dict[str, dict[str, Any]], fused_probs: np.ndarray,
                    schema: Schema, val: SplitTensors, test: SplitTensors,
                    masks: dict[str, dict[str, np.ndarray]]) -> None:
    """Add ``donor_ensemble_auc``, ``donor_stack_auc``, ``best_donor_by_val`` and the paired CIs
    ``ci`` (fused − best donor by validation AUC, − donor ensemble, − donor stack) to ``per_task``, each
    task on its labelled rows (``masks``; ``donor_scores`` kept the donors' logits of the same rows): the
    stack fitted on its labelled validation rows, everything else on its labelled test rows."""
    for i, task in enumerate(schema.task_names):
        row, d, m = per_task[task], donors[task], masks[task]
        y_test, y_val = test.labels[:, i].numpy()[m["test"]], val.labels[:, i].numpy()[m["val"]]
        best = int(np.argmax(d["val_auc"]))
        ens = ensemble_logits(d["test_logits"])
        stacked = stack(d["val_logits"], y_val, d["test_logits"])
        row.update(donor_ensemble_auc=auc(y_test, ens), donor_stack_auc=auc(y_test, stacked),
                   best_donor_by_val=d["names"][best], labelled_val_rows=int(m["val"].sum()))
        fused = fused_probs[m["test"], i]
        ci = paired_auc_cis(y_test, {"fused_minus_best_donor": [(fused, d["test_probs"][:, best])],
                                     "fused_minus_donor_ensemble": [(fused, ens)],
                                     "fused_minus_donor_stack": [(fused, stacked)]},
                            n_resamples=CI_RESAMPLES, confidence=CI_CONFIDENCE, seed=CI_SEED)
        ci["fused_minus_best_donor"].update(donor=d["names"][best], chosen_by="val_auc")
        row["ci"] = ci


def fused_cost(model: nn.Module, meta: dict[str, Any], rows: SplitTensors) -> dict[str, Any]:
    """``flops_per_row``, ``parameters``, ``trainable`` of the loaded model, counted on the first ``COST_ROWS`` of
    ``rows``; ``unpruned``: the same counts of the model as trained (``fused.json``'s ``cost``, None for a fused model
    saved before pruning existed); ``pruned``: what was left out and why (None: nothing)."""
    head = rows.head(COST_ROWS)
    return {**model_cost(model, head.sparse, head.dense).as_dict(),
            "unpruned": (meta.get("cost") or {}).get("unpruned"),
            "pruned": meta.get("architecture", {}).get("fused", {}).get("pruned")}


def cost_line(summary: dict[str, Any]) -> str:
    """One sentence for `emm evaluate`: what the model costs to score, and what pruning saved."""
    cost = summary["cost"]
    line = f"cost to score one row: {cost['flops_per_row']:,} FLOPs; {cost['parameters']:,} parameters"
    before, pruned = cost.get("unpruned"), cost.get("pruned")
    if before and pruned:
        off = [f"{what} {', '.join(pruned[what])}" for what in ("residual_off", "donors_off") if pruned.get(what)]
        off += ["level 0 shared with the donors"] if pruned.get("shared_level0") else []
        line += (f" (as trained: {before['flops_per_row']:,} FLOPs, {before['parameters']:,} parameters; pruned: "
                 f"{'; '.join(off)})")
    return line


VERDICT_TEXT = {GAIN: "a gain (the CI lies above 0)", NO_GAIN: "no measurable gain (the CI contains 0)",
                LOSS: "worse than the donor stack (the CI lies below 0)"}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The headline, one sentence per task: what fusion added over the donor stack, its paired CI, and
    plainly whether that is a gain. What a user reads first, before any AUC or Gain over the pool mean."""
    out = []
    for task, h in summary[STACK_KEY].items():
        rows = f" on {h['labelled_test_rows']:,} labelled test rows" if h.get("labelled_test_rows") else ""
        out.append(f"{task}: EMM − donor stack {h['diff']:+.5f}, {h['confidence']:.0%} CI "
                   f"[{h['low']:+.5f}, {h['high']:+.5f}]{rows}: {VERDICT_TEXT[h['verdict']]}")
    return out


def summary_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of `emm evaluate`'s table: fused − donor stack and its verdict lead; the AUCs, the
    other CIs and the Gain over the pool mean (the paper's number) follow."""
    columns = ["task", "EMM − donor stack, 95% CI", "verdict", "EMM AUC", "donor stack", "donor ensemble",
               "EMM − best donor (by val), 95% CI", "pool mean", "pool best", "Gain vs pool mean", "Gain %",
               "labelled test rows"]
    rows = []
    for task, r in summary["tasks"].items():
        h, best = summary[STACK_KEY][task], r["ci"]["fused_minus_best_donor"]
        rows.append([task, f"{h['diff']:+.5f} [{h['low']:+.5f}, {h['high']:+.5f}]", h["verdict"], f"{r['auc']:.5f}",
                     f"{r['donor_stack_auc']:.5f}", f"{r['donor_ensemble_auc']:.5f}",
                     f"{best['diff']:+.5f} [{best['low']:+.5f}, {best['high']:+.5f}] vs {best['donor']}",
                     f"{r['pool_mean_auc']:.5f}", f"{r['pool_best_auc']:.5f}", f"{r['gain']:+.5f}",
                     f"{r['gain_pct']:+.3f}", f"{r.get('labelled_test_rows', summary['rows_test']):,}"])
    return columns, rows


def plot_auc(per_task: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib  # local: the headless backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_task), figsize=(4.5 * len(per_task), 3.6), squeeze=False)
    for ax, (task, row) in zip(axes[0], per_task.items()):
        extra = {k: row[k] for k in ("donor_ensemble_auc", "donor_stack_auc") if k in row}
        names = [*row["pool"], *(k.removesuffix("_auc").replace("_", " ") for k in extra), "EMM (fused)"]
        values = [*row["pool"].values(), *extra.values(), row["auc"]]
        colors = ["#9aa5b1"] * len(row["pool"]) + ["#6c757d"] * len(extra) + ["#d9480f"]
        ax.barh(names, values, color=colors)
        lo = min(values)
        ax.set_xlim(lo - (max(values) - lo) * 1.5 - 1e-3, max(values) + (max(values) - lo) * 0.5 + 1e-4)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.4f}", va="center", fontsize=8)
        ax.set_title(f"{task}: test AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_fused_pool(meta: dict[str, Any], fused_dir: Path, pool: list[tuple[PoolEntry, nn.Module]]) -> None:
    """The fused model was fused from this pool (``fused.json``'s ``made_from``, in plan order as fuse has it)."""
    entries = [e for e, _ in pool]
    now = fused_pool(entries)
    recorded = (meta.get("made_from") or {}).get("pool")
    if recorded is None:
        raise EMMError(f"fused model in {fused_dir} records no pool it was fused from (written by an older EMM), so "
                       "it cannot be compared with this pool's donors; rerun `emm fuse`")
    if recorded != now:
        raise EMMError(f"fused model in {fused_dir} was made from another pool (digest {recorded!r}) than the one in "
                       f"pool/ now ({now!r}), so its Gain over these donors would mean nothing; rerun `emm decompose` "
                       "and `emm fuse`")


def evaluate(dataset: str, data_dir: Path, pool_dir: Path, fused_dir: Path, out_dir: Path, *,
             tracking: TrackingConfig | None = None, expected: dict[str, dict] | None = None) -> dict[str, Any]:
    """Score the saved fused model on the test split and write ``eval/`` (metrics.json, auc.json, plot);
    with ``tracking``, also register it (``emm.pipeline.register``) and record the version in metrics.json.
    The pool's models are scored too (validation and test rows): their AUCs, the donor baselines and the
    paired CIs of ``donor_baselines``. ``expected``: the signatures the params' pool gives
    (``stage_pool_signatures``), checked against pool.json.

    Why registration happens inside the atomic folder: ``eval/metrics.json`` must never describe a
    registration that did not happen. A stage killed or failing while registering leaves the previous
    ``eval/`` (or none), never a new one without its version.
    """
    schema = Schema.load(data_dir)
    pool = load_pool(pool_dir, schema, expected)
    model, meta = load_fused(fused_dir, schema)
    check_fused_pool(meta, fused_dir, pool)
    test, val = load_split(data_dir, "test", schema), load_split(data_dir, "val", schema)
    masks = task_masks(schema, val, test)
    probs = predict_proba(model, test)
    metrics = fused_metrics(probs, test, masks, what=f"fused model in {fused_dir}")
    donors = donor_scores(pool, schema, val, test, masks)
    per_task = compare_with_pool(metrics, donors)
    donor_baselines(per_task, donors, probs, schema, val, test, masks)
    summary = {"dataset": dataset, STACK_KEY: fused_minus_stack(per_task), "rows_test": len(test),
               "mean_test_auc": mean_auc(metrics), "tasks": per_task, "mlflow_run_id": meta.get("mlflow_run_id"),
               "cost": fused_cost(model, meta, test)}
    with atomic_dir(out_dir) as tmp:
        (tmp / "plots").mkdir()
        write_json(tmp / "metrics.json", summary)
        write_json(tmp / "auc.json", [{"model": name, "task": t, "auc": value}
                                      for t, row in per_task.items()
                                      for name, value in [*row["pool"].items(),
                                                          ("donor-ensemble", row["donor_ensemble_auc"]),
                                                          ("donor-stack", row["donor_stack_auc"]), ("emm", row["auc"])]])
        plot_auc(per_task, tmp / "plots" / "auc.png")
        if tracking is not None:
            summary["registered_version"] = register_fused(dataset, data_dir, fused_dir, tmp, summary, tracking)
            write_json(tmp / "metrics.json", summary)
    return summary


def evaluate_stage(dataset: str, params: Path | str | None = None, *, register: bool = True) -> dict[str, Any]:
    """Evaluate, then (unless ``register`` is off) register the fused model as ``emm-<dataset>`` @challenger;
    the registered version is recorded in ``eval/metrics.json``."""
    cfg = load_params(params)
    dirs = [stage_dir(cfg, dataset, s) for s in ("data", "pool", "fused", "eval")]
    return evaluate(dataset, *dirs, tracking=cfg.tracking if register else None,
                    expected=stage_pool_signatures(cfg, dataset))
