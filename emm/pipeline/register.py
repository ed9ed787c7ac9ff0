"""Stage 6, ``register`` / ``promote``: the fused model as a version of ``emm-<dataset>`` in the MLflow registry.

``register_fused`` logs the scorable model into the fuse run, registers a new version and aliases it
``challenger``; evaluating the same fused model again (same ``fused.safetensors`` sha256) reuses its
version and moves ``challenger`` back to it, so there is one version per fused model, also when two
evaluations register it at once (``registry.registration_lock`` serialises them per registered model).
``promote`` moves ``champion`` to a version only if its mean test AUC beats the current champion's (the
policy lives here; ``emm.tracking.registry`` only reads and writes the registry).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from emm.errors import EMMError
from emm.fusion.saved import FUSED_JSON, FUSED_WEIGHTS
from emm.io import read_json, sha256_file
from emm.pipeline.params import TrackingConfig, load_params
from emm.tracking import registry
from emm.tracking.pyfunc import BUILDERS
from emm.tracking.runs import reopen_run
from emm.tracking.store import registered_name

log = logging.getLogger(__name__)
FUSED_MODEL_BUILDER = BUILDERS[1]
STACK_CI = "fused_minus_donor_stack"  # the paired CI (evaluate's ``ci``) the headline is read from
STACK_KEY = "fused_minus_stack"  # the headline: in metrics.json, and the prefix of its run metrics and version tags
GAIN, NO_GAIN, LOSS = "gain", "no measurable gain", "loss"


def stack_verdict(low: float, high: float) -> str:
    """What a CI of fused − donor stack says: ``gain`` only when it lies above 0, ``loss`` below 0, and
    ``no measurable gain`` when it contains 0 (whatever the point estimate: its sign is noise then)."""
    if low > 0:
        return GAIN
    if high < 0:
        return LOSS
    return NO_GAIN


def fused_minus_stack(per_task: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task, what fusion added over the donor stack (a logistic regression on the donors' logits, fitted
    on validation rows): the paired CI ``fused_minus_donor_stack`` and its verdict.

    Why this leads the summary: the stack is what a pool gives for free, so it is the bar fusion must clear;
    the Gain over the pool *mean* is the paper's number but counts the plain ensembling of several donors as
    fusion's doing, which makes it large whether or not fusion added anything."""
    out = {}
    for task, row in per_task.items():
        ci = row["ci"][STACK_CI]
        out[task] = {"diff": ci["diff"], "low": ci["low"], "high": ci["high"], "confidence": ci["confidence"],
                     "verdict": stack_verdict(ci["low"], ci["high"]), "fused_auc": ci["auc_a"],
                     "donor_stack_auc": ci["auc_b"], "labelled_test_rows": row.get("labelled_test_rows")}
    return out


def stack_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The headline as run metrics: ``fused_minus_stack_<task>`` and its ``_ci_low`` / ``_ci_high``."""
    out = {}
    for task, h in summary[STACK_KEY].items():
        out.update({f"{STACK_KEY}_{task}": h["diff"], f"{STACK_KEY}_{task}_ci_low": h["low"],
                    f"{STACK_KEY}_{task}_ci_high": h["high"]})
    return out


def stack_tags(summary: dict[str, Any]) -> dict[str, str]:
    """The headline as tags (of the registered version, and of the run): the metrics above formatted as the
    other score tags are (``test_auc_<task>``: 6 decimals), and ``fused_minus_stack_<task>_verdict``."""
    tags = {key: f"{value:.6f}" for key, value in stack_metrics(summary).items()}
    tags.update({f"{STACK_KEY}_{task}_verdict": h["verdict"] for task, h in summary[STACK_KEY].items()})
    return tags


def cost_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """What the registered model costs to score (``evaluate``'s ``cost``) as run metrics and version tags:
    ``fused_flops_per_row``, ``fused_parameters`` and, when it was pruned, the same ``..._unpruned``."""
    cost = summary.get("cost") or {}
    out = {f"fused_{k}": float(cost[k]) for k in ("flops_per_row", "parameters") if k in cost}
    if cost.get("unpruned"):
        out.update({f"fused_{k}_unpruned": float(cost["unpruned"][k]) for k in ("flops_per_row", "parameters")})
    return out


def register_fused(dataset: str, data_dir: Path, fused_dir: Path, eval_dir: Path, summary: dict[str, Any],
                   tracking: TrackingConfig) -> str:
    """Log the pyfunc into the fuse run, register a new version of emm-<dataset>, alias it challenger.

    The version and the run are tagged with what fusion added over the donor stack (``stack_tags``), the
    first thing to read about a fused model.

    A version already registered from the same fused weights (its ``fused_sha256`` tag) is reused instead:
    ``challenger`` moves to it and ``summary`` says so (``registered_reused``), so that rerunning
    ``emm evaluate`` does not pile up versions of one model."""
    meta = read_json(Path(fused_dir) / FUSED_JSON)
    weights = Path(fused_dir) / FUSED_WEIGHTS
    fused_sha256 = sha256_file(weights)
    name = registered_name(dataset)
    # one registration of <name> at a time, from the check for these weights until the new version is tagged
    with registry.registration_lock(name, tracking.store), \
            reopen_run(dataset, tracking.store, meta.get("mlflow_run_id"), "fused-evaluate") as tracker:
        costs = cost_metrics(summary)
        tracker.log_metrics({**stack_metrics(summary), "eval_mean_test_auc": summary["mean_test_auc"],
                             **{f"gain_{t}": r["gain"] for t, r in summary["tasks"].items()}, **costs})
        tracker.set_tags({**stack_tags(summary), **{k: f"{v:.0f}" for k, v in costs.items()}})
        tracker.log_artifact(Path(eval_dir) / "metrics.json", "eval")
        tracker.log_artifact(Path(eval_dir) / "plots" / "auc.png", "eval")
        existing = registry.version_with_tag(name, registry.DIGEST_TAG, fused_sha256)
        summary["fused_sha256"], summary["registered_reused"] = fused_sha256, existing is not None
        if existing is not None:
            version = str(existing.version)
            registry.set_alias(name, registry.CHALLENGER, version)
            log.info("%s version %s was registered from these fused weights already: reused it, alias %s",
                     name, version, registry.CHALLENGER)
            return version
        version = tracker.log_model("model", builder=FUSED_MODEL_BUILDER, config=meta["architecture"],
                                    outputs=meta["tasks"], weights=weights, data_dir=data_dir, registered_name=name)
        assert version is not None  # a registered_name always yields a version
        registry.tag_version(name, version, {
            **stack_tags(summary),
            registry.SCORE_TAG: f"{summary['mean_test_auc']:.6f}",
            **{f"test_auc_{t}": f"{r['auc']:.6f}" for t, r in summary["tasks"].items()},
            registry.DIGEST_TAG: fused_sha256,
            **{k: f"{v:.0f}" for k, v in costs.items()},
        })
    log.info("registered %s version %s as %s", name, version, registry.CHALLENGER)
    return version


def promote(dataset: str, store: Path, version: str | None = None) -> tuple[bool, str]:
    """Move ``champion`` to ``version`` (default: the challenger) only if its mean test AUC beats the
    current champion's. Returns (promoted, reason); changes nothing when not promoted."""
    name = registered_name(dataset)
    registry.require_model(name, store, fix=f"run `emm evaluate {dataset}` first (it registers the fused model)")
    candidate = registry.get_version(name, version) if version else registry.version_by_alias(name, registry.CHALLENGER)
    if candidate is None:
        raise EMMError(f"{name!r} has no {registry.CHALLENGER!r} alias: name a version with --version")
    if registry.is_compact(candidate):  # champion is the best fused model; a compact one is served as @fast
        raise EMMError(f"version {candidate.version} of {name!r} is a compact model (`emm compress`), not a fused one: "
                       f"champion is for fused models; serve the compact one as models:/{name}@{registry.FAST}")
    champion = registry.version_by_alias(name, registry.CHAMPION)
    new = registry.version_score(candidate)
    if champion is not None and str(champion.version) == str(candidate.version):
        return False, f"version {candidate.version} is already the champion"
    if champion is not None and new <= registry.version_score(champion):
        return False, (f"not promoted: version {candidate.version} mean test AUC {new:.5f} does not beat champion "
                       f"version {champion.version} ({registry.version_score(champion):.5f})")
    registry.set_alias(name, registry.CHAMPION, str(candidate.version))
    before = f"version {champion.version} ({registry.version_score(champion):.5f})" if champion else "no champion"
    return True, f"promoted version {candidate.version} (mean test AUC {new:.5f}) to champion over {before}"


def promote_stage(dataset: str, params: Path | str | None = None, *, version: str | None = None) -> tuple[bool, str]:
    return promote(dataset, load_params(params).tracking.store, version)
