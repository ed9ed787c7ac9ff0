"""The hybrid rows of Table I (EMM, or the donors, stacked with LightGBM on validation scores), built from
stored per-row scores exactly as a reader would rebuild them by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from harness.experiments import paired


def _job(tmp: Path, kind: str, method: str, seed: int, tasks: list[str], scores: dict[str, np.ndarray],
         score_kind: str, data_dir: Path, val_auc: float = 0.8) -> dict:
    paths = {}
    for split, arr in scores.items():
        path = tmp / f"{kind}-{method}-{seed}.{split}.npy"
        np.save(path, arr.astype(np.float32))
        paths[split] = str(path)
    return {"kind": kind, "method": method, "seed": seed, "task_set": "a+b", "data_dir": str(data_dir),
            "tasks": {t: {"val_auc": val_auc, "test_auc": 0.0} for t in tasks}, "scores": paths,
            "score_kind": score_kind, "score_tasks": tasks}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


@pytest.fixture
def results(tmp_path: Path) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    n = 2000
    data = tmp_path / "data"
    data.mkdir()
    latent = {s: rng.normal(size=(n, 2)) for s in ("val", "test")}
    labels = {s: (latent[s] + rng.normal(size=(n, 2)) > 0.8).astype(int) for s in ("val", "test")}
    for s in ("val", "test"):
        pd.DataFrame({"a": labels[s][:, 0], "b": labels[s][:, 1]}).to_parquet(data / f"{s}.parquet")

    def noisy(scale: float) -> dict[str, np.ndarray]:
        return {s: latent[s] + scale * rng.normal(size=(n, 2)) for s in ("val", "test")}

    out, raw = [], {}
    for seed in (1, 2):
        for t, task in enumerate(("a", "b")):
            for m in ("mlp", "dcn"):
                logits = noisy(1.0)
                out.append(_job(tmp_path, "pool", f"{task}-{m}", seed, [task],
                                {s: v[:, t:t + 1] for s, v in logits.items()}, "logit", data))
        raw[("fused", seed)], raw[("lightgbm", seed)] = noisy(0.7), noisy(0.9)
        out.append(_job(tmp_path, "fused", "full", seed, ["a", "b"],
                        {s: _sigmoid(v) for s, v in raw[("fused", seed)].items()}, "probability", data))
        out.append(_job(tmp_path, "lightgbm", "lightgbm", seed, ["a", "b"],
                        {s: _sigmoid(v) for s, v in raw[("lightgbm", seed)].items()}, "probability", data))
    return out, {"labels": labels, "raw": raw}


def test_hybrid_is_the_stack_of_emm_and_lightgbm_fitted_on_validation(results) -> None:
    jobs, truth = results
    scores = paired.collect(jobs, "a+b", ["a", "b"])
    aucs = paired.donor_aucs(scores)
    for t, task in enumerate(("a", "b")):
        expected = []
        for seed in (1, 2):
            # by hand: probabilities (float32, as stored) back to logits, a logistic regression on validation
            def logit(split: str, kind: str) -> np.ndarray:
                p = np.clip(_sigmoid(truth["raw"][(kind, seed)][split][:, t]).astype(np.float32).astype(np.float64),
                            1e-7, 1 - 1e-7)
                return np.log(p / (1 - p))
            x_val = np.column_stack([logit("val", "fused"), logit("val", "lightgbm")])
            x_test = np.column_stack([logit("test", "fused"), logit("test", "lightgbm")])
            lr = LogisticRegression(max_iter=1000).fit(x_val, truth["labels"]["val"][:, t])
            expected.append(roc_auc_score(truth["labels"]["test"][:, t], lr.decision_function(x_test)))
        assert aucs[paired.HYBRID][task] == pytest.approx(expected, abs=1e-9)
        assert len(aucs[paired.DONOR_HYBRID][task]) == 2
        # two noisy views of one latent stack into a better score than either: the rows are not a copy
        lgb = [roc_auc_score(truth["labels"]["test"][:, t], truth["raw"][("lightgbm", s)]["test"][:, t]) for s in (1, 2)]
        assert np.mean(expected) > np.mean(lgb)


def test_paired_rows_compare_the_hybrid_with_lightgbm_and_the_donors_hybrid(results) -> None:
    jobs, _ = results
    rows = paired.paired_rows(paired.collect(jobs, "a+b", ["a", "b"]))
    by = {(r.comparison, r.task): r for r in rows}
    for task in ("a", "b"):
        for label in ("hybrid − LightGBM", "hybrid − donors' hybrid", "LightGBM", "donor stack"):
            r = by[(label, task)]
            assert r.seeds == 2 and r.low <= r.diff <= r.high
        assert by[("hybrid − LightGBM", task)].low > 0  # the stack is clearly better than its weaker member here
    lines = paired.ci_section(rows, ["a", "b"], {})
    assert any(line.startswith("| hybrid − LightGBM |") for line in lines)
    assert any(line.startswith("| EMM − donor stack |") for line in lines)


def test_no_hybrid_without_lightgbm_validation_scores(results) -> None:
    jobs, _ = results
    for r in jobs:  # as a result from before LightGBM kept its validation scores
        if r["kind"] == "lightgbm":
            r["scores"].pop("val")
    aucs = paired.donor_aucs(paired.collect(jobs, "a+b", ["a", "b"]))
    assert not aucs[paired.HYBRID] and not aucs[paired.DONOR_HYBRID]
    assert len(aucs[paired.STACK]["a"]) == 2
