"""Table I with tree donors, from stored per-row scores: the "EMM with tree donors" and "EMM (fused, networks only)"
rows, the best donor chosen by validation AUC among the networks and the trees alike, the single-task mean of the
networks alone, and the paired CI of EMM with tree donors against EMM on the networks, as a reader would redo it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from harness.experiments import paired
from harness.experiments.members import NETWORKS_EMM
from harness.experiments.report import table1_rows, write_table1

TASKS = ["a", "b"]


def _job(tmp: Path, kind: str, method: str, seed: int, tasks: list[str], test: np.ndarray, data: Path,
         val_auc: float, **extra) -> dict:
    paths = {split: str(tmp / f"{kind}-{method}-{seed}.{split}.npy") for split in ("val", "test")}
    for path in paths.values():  # val = test rows here: the donor stack needs validation scores, no test hangs on them
        np.save(path, test.astype(np.float32))
    aucs = {t: {"val_auc": val_auc, "test_auc": 0.0} for t in tasks}
    return {"kind": kind, "method": method, "seed": seed, "task_set": "a+b", "data_dir": str(data), "tasks": aucs,
            "scores": paths, "score_kind": "logit", "score_tasks": tasks, **extra}


@pytest.fixture
def results(tmp_path: Path) -> tuple[list[dict], np.ndarray]:
    rng = np.random.default_rng(0)
    n = 3000
    latent = rng.normal(size=(n, 2))
    y = (latent + rng.normal(size=(n, 2)) > 0.8).astype(int)
    for split in ("val", "test"):
        pd.DataFrame({"a": y[:, 0], "b": y[:, 1]}).to_parquet(tmp_path / f"{split}.parquet")
    out = []
    for seed in (1, 2):
        def noisy(scale: float) -> np.ndarray:
            return latent + scale * rng.normal(size=(n, 2))
        for t, task in enumerate(TASKS):  # the tree has the best validation AUC, not the best test AUC
            out.append(_job(tmp_path, "pool", f"{task}-mlp", seed, [task], noisy(0.8)[:, t:t + 1], tmp_path, 0.80,
                            member="network"))
            out.append(_job(tmp_path, "pool", f"{task}-lgbm", seed, [task], noisy(1.5)[:, t:t + 1], tmp_path, 0.90,
                            member="tree"))
        out.append(_job(tmp_path, "fused", "full", seed, TASKS, noisy(0.5), tmp_path, 0.9))
        out.append(_job(tmp_path, "fused", NETWORKS_EMM, seed, TASKS, noisy(0.7), tmp_path, 0.9))
    for r in out:  # test AUCs as the jobs report them
        for j, task in enumerate(r["score_tasks"]):
            r["tasks"][task]["test_auc"] = roc_auc_score(y[:, TASKS.index(task)], np.load(r["scores"]["test"])[:, j])
    return out, y


def test_tree_donors_get_their_own_emm_row_and_paired_cis(results, tmp_path: Path) -> None:
    jobs, y = results
    scores = paired.collect(jobs, "a+b", TASKS)
    assert scores.trees == {"pool:a-lgbm", "pool:b-lgbm"} and scores.emm_name == paired.TREE_EMM
    rows = {(r.title, r.task): r for r in paired.paired_rows(scores)}
    best = rows[(f"{paired.TREE_EMM} − best donor by validation AUC", "a")]
    assert best.against == "pool:a-lgbm"  # by validation AUC, the trees among the candidates

    def test_of(method: str, seed: int, task: str) -> np.ndarray:
        r = next(r for r in jobs if (r["method"], r["seed"]) == (method, seed))
        return np.load(r["scores"]["test"])[:, r["score_tasks"].index(task)]
    for i, task in enumerate(TASKS):
        ci = rows[(f"{paired.TREE_EMM} − EMM networks only", task)]
        per_seed = [roc_auc_score(y[:, i], test_of("full", s, task))
                    - roc_auc_score(y[:, i], test_of(NETWORKS_EMM, s, task)) for s in (1, 2)]
        assert ci.against == paired.NETWORKS and ci.seeds == 2
        assert ci.diff == pytest.approx(np.mean(per_seed), abs=1e-9)
        assert ci.seed_std == pytest.approx(np.std(per_seed, ddof=1), abs=1e-9)
        assert ci.low <= ci.diff <= ci.high

    table = {r.name: r for r in table1_rows(jobs, "a+b", TASKS, scores)}
    assert table[paired.TREE_EMM].kind == "emm" and table[paired.TREE_EMM].paper_key is None
    assert table["EMM (fused, networks only)"].paper_key == "emm"  # the paper's EMM fuses networks
    assert table["a-lgbm"].kind == "tree" and "EMM (fused)" not in table
    def pool_auc(method: str, seed: int) -> float:
        return next(r for r in jobs if (r["method"], r["seed"]) == (method, seed))["tasks"]["a"]["test_auc"]
    mean = table["single-task mean"].cells["a"].mean
    assert mean == pytest.approx(np.mean([pool_auc("a-mlp", s) for s in (1, 2)]))  # the networks': trees left out
    best = table["best single-task donor"].cells["a"].mean
    assert best == pytest.approx(np.mean([max(pool_auc("a-mlp", s), pool_auc("a-lgbm", s)) for s in (1, 2)]))

    md, _ = write_table1("demo", list(table.values()), TASKS, "header", tmp_path, paired.paired_rows(scores))
    text = md.read_text()
    assert f"| **{paired.TREE_EMM}** |" in text and "| EMM (fused, networks only) |" in text
    assert f"| {paired.TREE_EMM} − EMM networks only |" in text and "Tree members `a-lgbm`, `b-lgbm`" in text
    assert f"- a: {paired.TREE_EMM} − best donor by validation AUC (a-lgbm) = " in text  # says which donor
    assert f"- a: {paired.TREE_EMM} is " in text  # the verdict names the row it speaks of


def test_without_trees_emm_keeps_its_name(results) -> None:
    jobs, _ = results
    plain = [r for r in jobs if r.get("member") != "tree" and r["method"] != NETWORKS_EMM]
    scores = paired.collect(plain, "a+b", TASKS)
    assert not scores.trees and scores.emm_name == "EMM"
    titles = {r.title for r in paired.paired_rows(scores)}
    assert "EMM − best donor by validation AUC" in titles and not any("networks only" in t for t in titles)
    names = {r.name for r in table1_rows(plain, "a+b", TASKS, scores)}
    assert "EMM (fused)" in names and paired.TREE_EMM not in names
