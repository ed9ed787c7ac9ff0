"""Real `dvc repro` in a temporary copy of the repository: first run executes, second does nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def repo_copy(tmp_path, census_small_raw) -> Path:
    """Tracked files of this checkout + a small real Census slice as data/census-income."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    dst = tmp_path / "repo"
    for rel in files:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    shutil.copytree(census_small_raw, dst / "data" / "census-income")
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    (dst / "data.dvc").unlink()  # the real data.dvc describes the full raw folder; this copy has a slice
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["pretrain"]["train"].update(max_epochs=2, lr=0.005, batch_size=512)
    for spec in params["pretrain"]["pool"]["census-income"]:
        spec["hidden"] = [16, 8, 4]
    params["tracking"]["log_models"] = False
    (dst / "params.yaml").write_text(yaml.safe_dump(params))
    return dst


def test_repro_runs_once_then_nothing(repo_copy):
    first = dvc(["repro"], repo_copy)
    assert first.returncode == 0, first.stderr + first.stdout
    for stage in ("ingest", "pretrain", "decompose"):
        assert f"Running stage '{stage}'" in first.stdout
    assert (repo_copy / "artifacts/census-income/data/train.parquet").exists()
    assert (repo_copy / "artifacts/census-income/components/plan.json").exists()
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
    third = dvc(["repro"], repo_copy)
    assert third.returncode == 0, third.stderr
    assert "Running stage 'pretrain'" in third.stdout and "Running stage 'decompose'" in third.stdout
    assert "Running stage 'ingest'" not in third.stdout
