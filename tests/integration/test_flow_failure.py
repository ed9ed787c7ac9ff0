"""The ``emm`` flow, called directly on a temporary Prefect API and a real MLflow store:
a failing stage fails the flow with its EMMError message and registers nothing; the next run resumes from
the cached stages; a deleted output folder is recomputed even though its cache record exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import REPO

POOL = ["income-mlp", "income-dcn", "marital-mlp", "marital-resmlp"]
HALF_INCOME = {"income": 0.5}


def write_profile(project: Path, label_fraction: dict[str, float] | None = None, **fuse: object) -> Path:
    """params/tiny.yaml with every path absolute inside ``project`` (the flow runs in pytest's cwd), and
    ``ingest.label_fraction`` when given."""
    params = yaml.safe_load((REPO / "params" / "tiny.yaml").read_text())
    params["paths"] = {"raw_root": str(project / "data"), "artifacts": str(project / "artifacts")}
    if label_fraction:
        params["ingest"]["label_fraction"] = label_fraction
    params["tracking"]["store"] = str(project / "mlruns")
    params["fuse"].update(fuse)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def project(tmp_path, census_small_raw, monkeypatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    shutil.copytree(census_small_raw, tmp_path / "data" / "census-income")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def prefect_api(project):
    """A throwaway Prefect API (own database) and result store inside the project."""
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = project / ".prefect"
    with temporary_settings({PREFECT_HOME: home, PREFECT_LOCAL_STORAGE_PATH: home / "storage"}):
        with prefect_test_harness(server_startup_timeout=120):
            yield home


FINAL = {"Completed", "Cached", "Failed", "Crashed", "Cancelled"}


def task_states(flow_run_id, expect: tuple[str, ...], timeout: float = 60.0) -> dict[str, str]:
    """task -> state name (Completed, Cached, Failed, ...) in one flow run; the four pool-model task runs
    ("pretrain-<model>") are folded into "pretrain" when they agree, else listed.

    Why it waits: Prefect 3 reports task-run states to the API as events, sent in the background, so a
    flow that has just returned may not have all its task runs (or their last state) readable yet; CI
    once read the failed run before its ``fuse`` task run had arrived. It polls until every task in
    ``expect`` is there and every task run is in a final state, then answers what it read."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        states: dict[str, str] = {}
        for r in runs:
            name = r.name if r.name.startswith("pretrain-") else r.name.rsplit("-", 1)[0]  # "<task>-<suffix>"
            states[name] = r.state.name if r.state else "Pending"
        pool = {v for k, v in states.items() if k.startswith("pretrain-")}
        if len(pool) == 1 and sum(k.startswith("pretrain-") for k in states) == len(POOL):
            states["pretrain"] = pool.pop()
        settled = set(expect) <= set(states) and set(states.values()) <= FINAL
        if settled or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def assert_income_members_trained_on_half(artifacts: Path) -> None:
    """The flow's ingest took ``label_fraction``; each income member recorded training on those rows only."""
    schema = json.loads((artifacts / "data" / "schema.json").read_text())
    income = next(t for t in schema["tasks"] if t["name"] == "income")
    assert 0.4 * schema["rows"]["train"] < income["labelled"]["train"] < 0.6 * schema["rows"]["train"]
    for name in POOL:
        record = json.loads((artifacts / "pool-work" / name / "entry.json").read_text())["labelled"]
        expected = income["labelled"]["train"] if name.startswith("income") else schema["rows"]["train"]
        assert record["train"] == expected, name


def registry_versions(store: Path) -> list:
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    # the fused model's versions: the compress stage may add a compact one (tag compact), or not, by its own gate
    return [v for v in client.search_model_versions("name = 'emm-census-income'") if v.tags.get("compact") != "true"]


def test_cache_keys_follow_their_inputs(project):
    """Each stage's key moves with its own params section and upstream, nothing else (as dvc.yaml says)."""
    from emm.pipeline.cache import STAGES, stage_cache_key, stage_output_ready
    from emm.pipeline.ingest import ingest_stage

    params = write_profile(project)
    ingest_stage("census-income", params)
    keys = {s: stage_cache_key("census-income", params, s, "income-mlp") for s in STAGES}
    assert len(set(keys.values())) == len(keys)
    assert stage_cache_key("census-income", params, "ingest") == keys["ingest"]  # stable
    assert stage_output_ready("census-income", params, "ingest")
    assert not stage_output_ready("census-income", params, "pretrain-model", "income-mlp")

    profile = yaml.safe_load(params.read_text())
    profile["pretrain"]["train"]["lr"] = 0.02
    params.write_text(yaml.safe_dump(profile))
    moved = {s: stage_cache_key("census-income", params, s, "income-mlp") for s in STAGES}
    assert moved["ingest"] == keys["ingest"]
    assert all(moved[s] != keys[s] for s in ("pretrain-model", "pretrain", "decompose", "fuse", "evaluate"))
    profile["fuse"]["tower"] = [6]
    params.write_text(yaml.safe_dump(profile))
    fused = {s: stage_cache_key("census-income", params, s, "income-mlp") for s in STAGES}
    assert [s for s in fused if fused[s] != moved[s]] == ["fuse", "evaluate", "export", "compress"]
    (project / "data" / "census-income" / "census-income.test.gz").write_bytes(b"")  # other raw bytes
    assert stage_cache_key("census-income", params, "ingest") != keys["ingest"]


@pytest.mark.slow
def test_failed_stage_fails_flow_then_rerun_resumes_from_cache(project, prefect_api):
    from flows.full_pipeline import full_pipeline

    from emm.tracking.runs import child_runs

    artifacts = project / "artifacts" / "census-income"
    # valid YAML and schema, refused when the fused model is built; half the income labels (issue 24: partial
    # labels through the flow)
    params = write_profile(project, HALF_INCOME, qkv_dim=0)
    failed = full_pipeline(dataset="census-income", params=str(params), promote=True, fuse_on="local",
                           return_state=True)
    assert failed.is_failed()
    assert "qkv_dim must be a positive integer, got 0" in failed.message
    states = task_states(failed.state_details.flow_run_id, ("ingest", "fuse"))
    assert states["fuse"] == "Failed" and "evaluate-register" not in states and "promote" not in states
    assert not (artifacts / "fused").exists() and not (artifacts / "eval").exists()
    assert registry_versions(project / "mlruns") == []  # nothing half-registered
    # the pool trained concurrently, each member's run nested under one parent run
    pool = yaml.safe_load((artifacts / "pool" / "pool.json").read_text())
    assert [m["name"] for m in pool["models"]] == POOL
    run_ids = {m["mlflow_run_id"] for m in pool["models"]}
    assert len(run_ids) == 4 and None not in run_ids
    uri = f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent_id = client.get_run(pool["models"][0]["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    children = child_runs("census-income", project / "mlruns", parent_id)
    assert sorted(c["name"] for c in children) == sorted(POOL)
    assert {c["status"] for c in children} == {"FINISHED"}
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert set(client.get_run(parent_id).data.metrics) == {f"test_auc_{n}" for n in POOL}
    assert_income_members_trained_on_half(artifacts)
    stamps = {p: p.stat().st_mtime_ns for p in [artifacts / "data" / "schema.json", artifacts / "pool" / "pool.json",
                                                *(artifacts / "pool-work" / n / "entry.json" for n in POOL)]}

    # fixed param: ingest, pretraining and decompose are cache hits; fuse, evaluate and promote run
    write_profile(project, HALF_INCOME, qkv_dim=None)
    done = full_pipeline(dataset="census-income", params=str(params), promote=True, return_state=True)  # auto:
    # no gpu work pool on this API, so fusion runs in-process
    assert done.is_completed(), done.message
    states = task_states(done.state_details.flow_run_id, ("ingest", "pool-run", "pretrain", "assemble-pool",
                                                              "decompose", "fuse", "evaluate-register"))
    for cached in ("ingest", "pool-run", "pretrain", "assemble-pool", "decompose"):
        assert states[cached] == "Cached", states
    assert states["fuse"] == "Completed" and states["evaluate-register"] == "Completed", states
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing upstream was rewritten
    versions = registry_versions(project / "mlruns")
    assert [str(v.version) for v in versions] == ["1"]
    assert float(versions[0].tags["mean_test_auc"]) > 0.5 and "test_auc_income" in versions[0].tags
    summary = done.result()
    assert summary["registered_version"] == "1" and set(summary["tasks"]) == {"income", "marital"}
    schema = json.loads((artifacts / "data" / "schema.json").read_text())
    income = next(t for t in schema["tasks"] if t["name"] == "income")
    # evaluate fitted the income donor stack on the labelled val rows only
    assert summary["tasks"]["income"]["labelled_val_rows"] == income["labelled"]["val"] < schema["rows"]["val"]

    # a deleted output folder is recomputed although its cache record is still there
    shutil.rmtree(artifacts / "components")
    again = full_pipeline(dataset="census-income", params=str(params), promote=False, fuse_on="local",
                          return_state=True)
    assert again.is_completed(), again.message
    states = task_states(again.state_details.flow_run_id, ("ingest", "decompose", "fuse"))
    assert states["decompose"] == "Completed" and states["ingest"] == "Cached" and states["fuse"] == "Cached", states
    assert (artifacts / "components" / "plan.json").is_file()
    assert [str(v.version) for v in registry_versions(project / "mlruns")] == ["1"]
