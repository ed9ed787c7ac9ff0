"""Real `dvc repro` in a temporary copy of the repository: first run executes, second does nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.integration.repo_copy import dvc, dvc_project


@pytest.fixture
def repo_copy(tmp_path, census_small_raw) -> Path:
    """Tracked files of this checkout + a small real Census slice as data/census-income."""
    dst = dvc_project(tmp_path / "repo", census_small_raw)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["pretrain"]["train"].update(max_epochs=2, lr=0.005, batch_size=512)
    for spec in params["pretrain"]["pool"]["census-income"]:  # the default pool, small: networks and trees
        spec.update({"rounds": 30, "early_stop": 5} if spec["arch"] == "lightgbm" else {"hidden": [16, 8, 4]})
    # fusion as short as pretraining: how many epochs the fused model trains (up to 30, by the pool) is not tested
    params["fuse"]["train"].update(max_epochs=2, batch_size=512)
    params["tracking"]["log_models"] = False
    params["compress"].update(flops_per_row=20_000)  # the stage runs; its size and length are not what is tested
    params["compress"]["train"].update(max_epochs=2, batch_size=512)
    params["ingest"]["label_fraction"] = {"income": 0.5}  # partial labels through `dvc repro` (issue 24)
    (dst / "params.yaml").write_text(yaml.safe_dump(params))
    return dst


@pytest.mark.slow  # end to end: real `dvc repro` of the pipeline, run three times
def test_repro_runs_once_then_nothing(repo_copy):
    first = dvc(["repro"], repo_copy)
    assert first.returncode == 0, first.stderr + first.stdout
    for stage in ("ingest", "pretrain", "decompose"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (repo_copy / "artifacts/census-income/data/train.parquet").exists()
    assert (repo_copy / "artifacts/census-income/components/plan.json").exists()
    assert_income_half_labelled(repo_copy / "artifacts/census-income")
    second = dvc(["repro"], repo_copy)
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    # a changed pretraining parameter reruns pretrain and what depends on it, not ingest
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["pretrain"]["train"]["seed"] = 7
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    status = dvc(["status"], repo_copy)  # what DVC sees before running anything: pretrain's params, not ingest
    assert status.returncode == 0, status.stderr
    assert "pretrain:" in status.stdout and re.search(r"modified:\s+pretrain\b", status.stdout), status.stdout
    assert "ingest:" not in status.stdout, status.stdout
    third = dvc(["repro", "decompose"], repo_copy)  # up to decompose: the stages after it were run above
    assert third.returncode == 0, third.stderr
    assert "Running stage 'pretrain'" in third.stdout and "Running stage 'decompose'" in third.stdout
    assert "Running stage 'ingest'" not in third.stdout


def assert_income_half_labelled(art: Path) -> None:
    """The run took ``ingest.label_fraction``: income labels on about half the train/val rows, the income
    members recorded that they trained on those rows only, and evaluate fitted the donor stack on the labelled
    val rows."""
    schema = json.loads((art / "data" / "schema.json").read_text())
    income = next(t for t in schema["tasks"] if t["name"] == "income")
    assert 0.4 * schema["rows"]["train"] < income["labelled"]["train"] < 0.6 * schema["rows"]["train"]
    assert income["labelled"]["test"] == schema["rows"]["test"]
    pool = json.loads((art / "pool" / "pool.json").read_text())
    members = [m["name"] for m in pool["models"] if m["task"] == "income"]
    assert members and all(pool["labelled_rows"][n]["train"] == income["labelled"]["train"] for n in members)
    metrics = json.loads((art / "eval" / "metrics.json").read_text())
    assert metrics["tasks"]["income"]["labelled_val_rows"] == income["labelled"]["val"] < schema["rows"]["val"]
