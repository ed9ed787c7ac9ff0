"""`emm evaluate` on a small real pool: the donor ensemble and stack AUCs and the paired CIs of the fused
model against them and against the best donor (chosen by validation AUC), recomputed independently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.fusion.saved import load_fused
from emm.models.pool import load_pool, read_pool
from emm.pipeline.decompose import decompose_pool
from emm.pipeline.fuse import fuse
from emm.pipeline.params import DecomposeConfig, FuseConfig, PretrainConfig, TrainConfig
from emm.pipeline.pretrain import pretrain

POOL = [
    {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16, 8]},
    {"name": "income-dcn", "task": "income", "arch": "dcn", "hidden": [16, 8]},
    {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16, 8]},
    {"name": "marital-res", "task": "marital", "arch": "resmlp", "hidden": [16, 8]},
]
TRAIN = TrainConfig(batch_size=512, max_epochs=2, patience=2, lr=5e-3, device="cpu")
CIS = ("fused_minus_best_donor", "fused_minus_donor_ensemble", "fused_minus_donor_stack")


@pytest.fixture(scope="module")
def evaluated(census_small_data, tmp_path_factory):
    """A pool, its components and a fused model laid out as the stages write them, then `emm evaluate`."""
    root = tmp_path_factory.mktemp("evaluate-ci")
    art = root / "artifacts" / "census-income"
    shutil.copytree(census_small_data, art / "data")
    data = art / "data"
    pretrain("census-income", data, art / "pool", art / "pool-work",
             PretrainConfig(train=TRAIN, pool={"census-income": POOL}), progress=False)
    decompose_pool(data, art / "pool", art / "components", DecomposeConfig())
    fuse("census-income", data, art / "pool", art / "components", art / "fused", art / "fused-work",
         FuseConfig(train=TRAIN), DecomposeConfig(), progress=False)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": {"artifacts": str(root / "artifacts")},
                                      "pretrain": {"train": TRAIN.model_dump(mode="json"),  # the pool's own params
                                                   "pool": {"census-income": POOL}},
                                      "tracking": {"store": str(root / "mlruns"), "log_models": False}}))
    mp = pytest.MonkeyPatch()
    mp.setattr("emm.cli.console", Console(width=250))  # the table unwrapped, into CliRunner's stdout
    from emm.cli import app

    result = CliRunner().invoke(app, ["evaluate", "census-income", "--no-register", "--params", str(params)])
    mp.undo()
    assert result.exit_code == 0, result.output
    return art, json.loads((art / "eval" / "metrics.json").read_text()), result.output


def _donor_logits(art: Path, split: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each donor's logits on a split, by a plain forward pass (one batch), and the split's labels."""
    schema = Schema.load(art / "data")
    data = load_split(art / "data", split, schema)
    with torch.no_grad():
        logits = {e.name: m.eval()(data.sparse, data.dense)[:, 0].numpy() for e, m in load_pool(art / "pool", schema)}
    return logits, data.labels.numpy()


def test_new_keys_exist_beside_the_old_ones_and_each_ci_holds_its_estimate(evaluated) -> None:
    _, metrics, _ = evaluated
    for task, row in metrics["tasks"].items():
        for old in ("auc", "logloss", "pool", "pool_mean_auc", "pool_best_auc", "gain", "gain_pct", "vs_best_donor"):
            assert old in row, (task, old)
        assert 0.5 < row["donor_ensemble_auc"] <= 1 and 0.5 < row["donor_stack_auc"] <= 1
        assert set(row["ci"]) == set(CIS)
        for name, ci in row["ci"].items():
            assert ci["n_resamples"] >= 1000 and ci["confidence"] == 0.95
            assert ci["low"] <= ci["diff"] <= ci["high"], (task, name, ci)
            assert ci["high"] - ci["low"] > 0, (task, name, ci)  # different models: a real interval
            assert ci["diff"] == pytest.approx(ci["auc_a"] - ci["auc_b"], abs=1e-12)
            assert ci["auc_a"] == pytest.approx(row["auc"], abs=1e-12)  # the fused AUC the table reports
        assert row["ci"]["fused_minus_donor_ensemble"]["auc_b"] == pytest.approx(row["donor_ensemble_auc"], abs=1e-12)
        assert row["ci"]["fused_minus_donor_stack"]["auc_b"] == pytest.approx(row["donor_stack_auc"], abs=1e-12)


def test_ensemble_and_stack_are_scored_on_the_same_test_rows(evaluated) -> None:
    art, metrics, _ = evaluated
    schema = Schema.load(art / "data")
    test_logits, y_test = _donor_logits(art, "test")
    val_logits, y_val = _donor_logits(art, "val")
    for i, task in enumerate(schema.task_names):
        names = [e["name"] for e in POOL if e["task"] == task]
        x_test = np.column_stack([test_logits[n] for n in names])
        x_val = np.column_stack([val_logits[n] for n in names])
        row = metrics["tasks"][task]
        assert row["donor_ensemble_auc"] == pytest.approx(roc_auc_score(y_test[:, i], x_test.mean(axis=1)), abs=1e-9)
        lr = LogisticRegression(max_iter=1000).fit(x_val, y_val[:, i])
        assert row["donor_stack_auc"] == pytest.approx(roc_auc_score(y_test[:, i], lr.decision_function(x_test)),
                                                       abs=1e-6)


def test_fused_minus_best_donor_is_the_difference_of_the_two_aucs(evaluated) -> None:
    art, metrics, _ = evaluated
    schema = Schema.load(art / "data")
    test = load_split(art / "data", "test", schema)
    model, _ = load_fused(art / "fused", schema)
    with torch.no_grad():
        fused = torch.sigmoid(model.eval()(test.sparse, test.dense)).numpy()
    logits, y = _donor_logits(art, "test")
    entries = read_pool(art / "pool")
    for i, task in enumerate(schema.task_names):
        row = metrics["tasks"][task]
        best = max((e for e in entries if e.task == task), key=lambda e: e.val_auc)  # by validation, not test
        ci = row["ci"]["fused_minus_best_donor"]
        assert ci["donor"] == row["best_donor_by_val"] == best.name and ci["chosen_by"] == "val_auc"
        donor_auc = roc_auc_score(y[:, i], torch.sigmoid(torch.from_numpy(logits[best.name])).numpy())
        assert ci["diff"] == pytest.approx(roc_auc_score(y[:, i], fused[:, i]) - donor_auc, abs=1e-12)
        assert ci["diff"] == pytest.approx(row["auc"] - row["pool"][best.name], abs=1e-9)  # pool.json's AUC


def test_auc_json_and_the_cli_table_show_the_donor_baselines(evaluated) -> None:
    art, metrics, output = evaluated
    rows = json.loads((art / "eval" / "auc.json").read_text())
    for task, row in metrics["tasks"].items():
        by_model = {r["model"]: r["auc"] for r in rows if r["task"] == task}
        assert by_model["donor-ensemble"] == row["donor_ensemble_auc"]
        assert by_model["donor-stack"] == row["donor_stack_auc"]
        assert by_model["emm"] == row["auc"]
    assert "donor ensemble" in output and "donor stack" in output and "best donor (by val), 95% CI" in output
    for task, row in metrics["tasks"].items():
        ci = row["ci"]["fused_minus_best_donor"]
        assert f"{ci['diff']:+.5f} [{ci['low']:+.5f}, {ci['high']:+.5f}] vs {ci['donor']}" in output
        assert f"{row['donor_stack_auc']:.5f}" in output
