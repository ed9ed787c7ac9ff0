"""A pool of built-in and outside models through the two orchestrators: `dvc repro` in a copy of the
repository (the user's factory module on PYTHONPATH, as a user would run it) and the Prefect flow, each
from raw Census rows to a registered fused model. The outside models are a network (factory + weights), a
LightGBM text file and an XGBoost JSON file (trained with the libraries' own APIs), and a built-in LightGBM
trains beside them: the trees join the fused model at the output."""

from __future__ import annotations

import shutil

import pytest
import yaml

from emm.models.pool import read_pool
from tests.conftest import REPO
from tests.integration.repo_copy import dvc, dvc_env, dvc_project
from tests.integration.test_byom_support import TINY_TRAIN, USER_MODULE, trained_rechub, user_code  # noqa: F401
from tests.integration.test_pool_trees import outside  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # end to end: real training, DVC and Prefect runs


TREES = {"income-xgb": "xgboost", "marital-lgbm": "lightgbm", "income-lgbm": "lightgbm"}


def mixed_pool(t, trees) -> list[dict]:
    return [{"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16]},
            {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16]},
            {"name": "marital-dcn", "task": "marital", "factory": f"{USER_MODULE}:build", "kwargs": t.dcn_kwargs,
             "weights": str(t.dcn_weights), "inputs": "dict", "output": "probability"},
            {"name": "income-xgb", "task": "income", "xgboost": str(trees / "income.json")},
            {"name": "marital-lgbm", "task": "marital", "lightgbm": str(trees / "marital.txt")},
            {"name": "income-lgbm", "task": "income", "arch": "lightgbm", "rounds": 30, "early_stop": 5,
             "num_leaves": 7}]


def check_trees_fused(artifacts) -> None:
    """Each tree member is in the pool with its source, and in the fused model at the output with its file."""
    pool = {e.name: e for e in read_pool(artifacts / "pool")}
    assert {n: pool[n].spec.format for n in TREES} == TREES
    assert pool["income-xgb"].source == pool["marital-lgbm"].source == "file" and pool["income-lgbm"].source == "builtin"
    fused = yaml.safe_load((artifacts / "fused" / "fused.json").read_text())
    members = {m["name"] for m in fused["architecture"]["fused"]["output_members"]}
    assert members == set(TREES) and all((artifacts / "fused" / pool[n].weights).is_file() for n in TREES)


def tiny_params(base: dict, t, trees, artifacts: str | None = None) -> dict:
    base["pretrain"] = {"train": TINY_TRAIN, "pool": {"census-income": mixed_pool(t, trees)}}
    base["decompose"] = {"align": "project", "head": "tower", "example_rows": 64}
    base["fuse"] = {"tower": [4], "train": TINY_TRAIN, "output": "donor_residual"}  # trees join a donor blend
    base["tracking"]["log_models"] = False
    if artifacts:
        base["paths"]["artifacts"] = artifacts
    return base


def test_dvc_repro_fuses_a_mixed_pool(trained_rechub, outside, census_small_raw, user_code, tmp_path):
    """``dvc repro evaluate``: raw rows to the registered fused model. Why not the stages after it (export,
    compress): the Prefect test below runs them on this same mixed pool, and tests/integration/test_dvc.py
    runs them under ``dvc repro``; here they would only add their time."""
    repo = dvc_project(tmp_path / "repo", census_small_raw)
    params = tiny_params(yaml.safe_load((repo / "params.yaml").read_text()), trained_rechub, outside)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = dvc_env(PYTHONPATH=f"{repo}:{user_code}")
    env.pop("MLFLOW_TRACKING_URI", None)
    done = dvc(["repro", "evaluate"], repo, env=env, timeout=800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    for stage in ("pretrain", "decompose", "fuse", "evaluate"):
        assert f"Running stage '{stage}'" in done.stdout
    pool = {e.name: e for e in read_pool(repo / "artifacts/census-income/pool")}
    assert pool["marital-dcn"].source == "factory" and pool["marital-dcn"].val_auc > 0.8
    metrics = yaml.safe_load((repo / "artifacts/census-income/eval/metrics.json").read_text())
    assert "marital-dcn" in metrics["tasks"]["marital"]["pool"] and metrics["registered_version"]
    check_trees_fused(repo / "artifacts/census-income")


def test_prefect_flow_fuses_a_mixed_pool(trained_rechub, outside, census_small_raw, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.full_pipeline import full_pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    shutil.copytree(census_small_raw, tmp_path / "data" / "census-income")
    monkeypatch.chdir(tmp_path)
    base = yaml.safe_load((REPO / "params" / "tiny.yaml").read_text())
    base["paths"]["raw_root"] = str(tmp_path / "data")
    base["tracking"]["store"] = str(tmp_path / "mlruns")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(base, trained_rechub, outside, str(tmp_path / "artifacts"))))
    home = tmp_path / ".prefect"
    with temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}):
        with prefect_test_harness(server_startup_timeout=120):
            summary = full_pipeline(dataset="census-income", params=str(params), promote=True, fuse_on="local")
    assert summary["tasks"]["marital"]["pool"]["marital-dcn"] > 0.8
    assert summary["registered_version"]
    pool = {e.name: e for e in read_pool(tmp_path / "artifacts/census-income/pool")}
    assert pool["marital-dcn"].origin.encoding == "recorded"
    check_trees_fused(tmp_path / "artifacts/census-income")
