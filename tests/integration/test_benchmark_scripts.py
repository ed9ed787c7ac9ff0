"""Smoke tests of the speed and accuracy scripts (harness/benchmarks/) on tiny data: each answers --help, runs
as ``python -m harness.benchmarks.<name>`` from outside the checkout, and the ones that can run on a Census
slice or a small synthetic table do, end to end. They print numbers nobody asserts on; what is checked is that
they still run against emm's public modules (the library moves under them) and print their report."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

SCRIPTS = sorted(p.stem for p in (REPO / "harness" / "benchmarks").glob("*.py") if p.stem != "__init__")


def run_script(name: str, *args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m harness.benchmarks.<name> ARGS`` in this process (torch is imported once for all of them)."""
    monkeypatch.setattr(sys, "argv", [f"harness.benchmarks.{name}", *args])
    monkeypatch.delitem(sys.modules, f"harness.benchmarks.{name}", raising=False)  # another script imported it
    runpy.run_module(f"harness.benchmarks.{name}", run_name="__main__", alter_sys=True)


def test_the_scripts_are_the_ones_the_readme_lists():
    readme = (REPO / "README.md").read_text()
    assert SCRIPTS and all(f"python -m harness.benchmarks.{name}" in readme for name in SCRIPTS), SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_answers_help(name: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        run_script(name, "--help", monkeypatch=monkeypatch)
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_script_runs_as_a_module_from_outside_the_checkout(tmp_path: Path) -> None:
    """The harness is installed with emm (pyproject's packages), not found only because the cwd is the repo."""
    done = subprocess.run([sys.executable, "-m", "harness.benchmarks.gate_modes", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "fusion-gate ablation" in done.stdout.lower()


def test_train_throughput_on_a_census_slice(census_small_data: Path, monkeypatch, capsys) -> None:
    run_script("train_throughput", "--data", str(census_small_data), "--rows", "2000", "--rounds", "1",
               "--threads", "1", "--batch-size", "256", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "2,000 train rows" in out and "x rechub" in out


def test_stream_memory_on_a_small_synthetic_table(tmp_path: Path, monkeypatch, capsys) -> None:
    """The parent synthesizes a table and measures a child process (itself, run as a module) on it."""
    monkeypatch.chdir(REPO)  # the synthetic table's settings: params.yaml `synth`
    run_script("stream_memory", "--rows", "4000", "--peer-rows", "0", "--threads", "1", "--keep", str(tmp_path),
               monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert "\nstream " in out and "peak RSS GB" in out


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, census_small_raw: Path) -> Path:
    """ingest -> pretrain -> decompose -> fuse on the Census slice with a tiny pool: what the scripts that
    measure the pipeline's own artifacts read. Returns the params file."""
    from emm.pipeline.decompose import decompose_stage
    from emm.pipeline.fuse import fuse_stage
    from emm.pipeline.ingest import ingest_stage
    from emm.pipeline.pretrain import pretrain_stage

    root = tmp_path_factory.mktemp("tiny-pipeline")
    (root / "raw").mkdir()
    (root / "raw" / "census-income").symlink_to(census_small_raw)
    small = {"hidden": [16, 8]}
    train = {"batch_size": 512, "max_epochs": 1, "lr": 0.01, "device": "cpu"}
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"raw_root": str(root / "raw"), "artifacts": str(root / "artifacts")},
        "tracking": {"store": str(root / "mlruns"), "log_models": False},
        "pretrain": {"train": train, "pool": {"census-income": [
            {"name": "income-mlp", "task": "income", "arch": "mlp", **small},
            {"name": "marital-mlp", "task": "marital", "arch": "mlp", **small}]}},
        "fuse": {"train": train, "tower": [4]},
    }))
    ingest_stage("census-income", params)
    pretrain_stage("census-income", params, track=False, progress=False)
    decompose_stage("census-income", params)
    fuse_stage("census-income", params, track=False, progress=False)
    return params


def test_gate_modes_on_a_tiny_pipeline(tiny_pipeline: Path, monkeypatch, capsys) -> None:
    run_script("gate_modes", "--params", str(tiny_pipeline), "--modes", "hard", monkeypatch=monkeypatch)
    assert "| hard |" in capsys.readouterr().out


def test_fusion_cost_on_a_tiny_pipeline(tiny_pipeline: Path, monkeypatch, capsys) -> None:
    run_script("fusion_cost", "--params", str(tiny_pipeline), "--rate-rows", "1000", "--rounds", "1",
               "--threads", "1", "--max-epochs", "1", "--fits", "fused,mmoe", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "samples/s" in out and "mmoe" in out.lower()


def test_score_speed_on_a_tiny_pipeline(tiny_pipeline: Path, monkeypatch, capsys) -> None:
    run_script("score_speed", "--params", str(tiny_pipeline), "--rows", "500", "--rounds", "1", "--threads", "1",
               "--batch-size", "256", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "LightGBM" in out


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory, census_small_raw: Path) -> tuple[Path, Path]:
    """Two tiny benchmark profiles (`full` and `minmax`, 2 seeds each) on the Census slice: the job stores the
    accuracy probes read. Returns (params, harness config)."""
    from harness.experiments.runner import run_benchmark

    root = tmp_path_factory.mktemp("tiny-benchmark")
    (root / "raw").mkdir()
    (root / "raw" / "census-income").symlink_to(census_small_raw)
    train = {"batch_size": 512, "max_epochs": 1, "lr": 0.01, "device": "cpu"}
    params, config = root / "params.yaml", root / "benchmark.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"raw_root": str(root / "raw"), "artifacts": str(root / "artifacts")},
        "tracking": {"store": str(root / "mlruns"), "log_models": False},
        "ingest": {"tasks": {"census-income": ["income", "marital"]}},
        "pretrain": {"train": train, "pool": {"census-income": [
            {"name": f"{t}-mlp", "task": t, "arch": "mlp", "hidden": [16, 8]} for t in ("income", "marital")]}},
        "fuse": {"train": train},
    }))
    profile = {"seeds": [1, 2], "raw_rows": 3000, "baselines": [], "ablations": ["full"], "lightgbm": False}
    config.write_text(yaml.safe_dump({"benchmark": {"out": str(root / "results"), "workers": 1, "profiles": {
        "full": profile, "minmax": {**profile, "numeric": {"mode": "minmax"}}}}}))
    for name in ("full", "minmax"):
        run_benchmark("census-income", params, config=config, profile=name, track=False)
    return params, config


def test_heldout_fusion_on_a_tiny_benchmark(tiny_benchmark, monkeypatch, capsys) -> None:
    params, config = tiny_benchmark
    run_script("heldout_fusion", "--params", str(params), "--config", str(config), "--seeds", "1,2",
               monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "held-out EMM test AUC" in out and "− donor stack (all val rows)" in out


def test_numeric_encoding_pairs_two_tiny_profiles(tiny_benchmark, monkeypatch, capsys) -> None:
    params, config = tiny_benchmark
    run_script("numeric_encoding", "--params", str(params), "--config", str(config), "--arms", "full", "minmax",
               monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "| EMM |" in out and "minmax − full [95% CI]" in out
    assert (params.parent / "results" / "census-income" / "minmax-vs-full.md").exists()
