"""End to end through real Prefect processes: a ``prefect server``, the process work pool
``emm-process``, the deployment ``emm/full-pipeline`` from prefect.yaml, a worker, and
``prefect deployment run``, on real Census rows in a temporary copy of the project with params/tiny.yaml.

The GPU route is exercised too: a ``gpu`` pool with a (CPU) worker online makes the flow send fusion
training to the ``emm-fuse/gpu`` deployment. Every process started here is stopped by its process group
in ``finally``; nothing is written to the checkout (the deployment works in the temporary project).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from tests.conftest import REPO
from tests.integration.repo_copy import copy_project

QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Long-running children, each in its own session (so a whole group can be signalled), logs in files."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs, self.started = env, logs, []

    def start(self, name: str, args: list[str], cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(args, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.started.append((name, proc, log))
        return proc

    def tail(self, name: str, lines: int = 60) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self) -> None:
        """The workers first, all at once (they ignore SIGTERM: SIGINT, then SIGKILL after a grace period), the
        server (started first) last. Why at once: a worker slow to stop then costs its grace period once, not
        once per worker."""
        workers, server = self.started[1:], self.started[:1]
        for wave in (workers, server):
            for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                running = [proc for _, proc, _ in wave if proc.poll() is None]
                for proc in running:
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + grace
                for proc in running:
                    try:
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        pass
            for _, proc, log in wave:
                try:  # children left in the group (a flow-run subprocess) go too
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                log.close()


def cli(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 120) -> str:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def clis(commands: list[list[str]], env: dict[str, str], cwd: Path, timeout: int = 120) -> list[str]:
    """``cli`` for commands that do not depend on each other, run at once: each is mostly its own imports, and
    one alone leaves the second core idle."""
    procs = [subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for args in commands]
    outs = []
    for args, proc in zip(commands, procs):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{stdout}\n{stderr}"
        outs.append(stdout)
    return outs


def wait_for(check, what: str, timeout: float, procs: Processes, log: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; {log} log:\n{procs.tail(log)}")


@pytest.mark.slow
def test_full_pipeline_deployment_runs_on_a_process_worker(tmp_path, census_small_raw):
    project = copy_project(tmp_path / "project")
    shutil.copytree(census_small_raw, project / "data" / "census-income")
    (tmp_path / "logs").mkdir()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(QUIET, PATH=f"{venv_bin}:{env.get('PATH', '')}", PREFECT_HOME=str(tmp_path / "prefect-home"),
               PREFECT_API_URL=api, OMP_NUM_THREADS="1", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_WORKER_HEARTBEAT_SECONDS="5", PYTHONUNBUFFERED="1",
               EMM_PRETRAIN_WORKERS="2")  # two pool models at a time whatever the core count
    prefect = [str(Path(venv_bin) / "prefect"), "--no-prompt"]
    repo_had_tiny = (REPO / "artifacts" / "tiny").exists()
    procs = Processes(env, tmp_path / "logs")
    try:
        procs.start("server", [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                    cwd=tmp_path)

        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, "the Prefect server's /api/health", 120, procs, "server")
        clis([[*prefect, "work-pool", "create", pool, "--type", "process"] for pool in ("emm-process", "gpu")],
             env, project)
        # the workers start (seconds of imports, on the other core) while the deployments are made: no run exists
        # for them to pick up before `deployment run`, which comes after both are seen online
        procs.start("worker", [*prefect, "worker", "start", "--pool", "emm-process", "--type", "process"], cwd=tmp_path)
        procs.start("gpu-worker", [*prefect, "worker", "start", "--pool", "gpu", "--type", "process"], cwd=tmp_path)
        deployed = cli([*prefect, "deploy", "-n", "full-pipeline", "-n", "gpu"], env, project, timeout=180)
        assert "emm/full-pipeline" in deployed and "emm-fuse/gpu" in deployed, deployed

        def online(pool: str):
            def check() -> bool:
                workers = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=5).json()
                return any(w.get("status") == "ONLINE" for w in workers)
            return check

        wait_for(online("emm-process"), "a worker online on emm-process", 90, procs, "worker")
        wait_for(online("gpu"), "a worker online on gpu", 90, procs, "gpu-worker")

        started = cli([*prefect, "deployment", "run", "emm/full-pipeline", "-p", "params=params/tiny.yaml"],
                      env, project)
        run_id = next(line.split("UUID:")[1].strip() for line in started.splitlines() if "UUID:" in line)

        def finished():
            run = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()
            return run if (run.get("state") or {}).get("type") in TERMINAL else None

        run = wait_for(finished, "the flow run to finish", 300, procs, "worker")
        assert run["state"]["type"] == "COMPLETED", (run["state"], procs.tail("worker", 120))

        # fusion went through the gpu pool's deployment, as a completed run of flow emm-fuse
        fuse_runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"name": {"any_": ["gpu"]}}},
                               timeout=5).json()
        assert [r["state"]["type"] for r in fuse_runs] == ["COMPLETED"], procs.tail("gpu-worker")
        # the AUC table as a markdown artifact
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["emm-census-income-auc"]}}},
                               timeout=5).json()
        assert len(artifacts) == 1 and "| income |" in artifacts[0]["data"] and "| marital |" in artifacts[0]["data"]

        # the registry in the temporary project got version 1, with its scores, as challenger and champion
        store = project / "artifacts" / "tiny" / "mlruns"
        uri = f"sqlite:///{store / 'mlflow.db'}"
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        # the fused model's version (the compress stage may add a compact one, tag compact, by its own gate)
        versions = [v for v in client.search_model_versions("name = 'emm-census-income'")
                    if v.tags.get("compact") != "true"]
        assert [str(v.version) for v in versions] == ["1"]
        version = versions[0]
        assert {"mean_test_auc", "test_auc_income", "test_auc_marital"} <= set(version.tags)
        for alias in ("challenger", "champion"):  # search results carry no aliases: ask by alias
            assert str(client.get_model_version_by_alias("emm-census-income", alias).version) == "1"
        metrics = client.get_run(version.run_id).data.metrics
        assert metrics["eval_mean_test_auc"] == pytest.approx(float(version.tags["mean_test_auc"]), abs=1e-6)
        summary = json.loads((project / "artifacts" / "tiny" / "census-income" / "eval" / "metrics.json").read_text())
        assert summary["registered_version"] == "1"
        # the four pool models ran as their own task runs, under one MLflow parent run
        task_runs = httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}},
                               timeout=5).json()
        pretrain_runs = [t for t in task_runs if t["name"].startswith("pretrain-")]
        assert sorted(t["name"] for t in pretrain_runs) == [
            "pretrain-income-dcn", "pretrain-income-mlp", "pretrain-marital-mlp", "pretrain-marital-resmlp"]
        spans = sorted((t["start_time"], t["end_time"]) for t in pretrain_runs)  # ISO times, same zone
        assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # concurrent
        pool = json.loads((project / "artifacts" / "tiny" / "census-income" / "pool" / "pool.json").read_text())
        parents = {client.get_run(m["mlflow_run_id"]).data.tags.get("mlflow.parentRunId") for m in pool["models"]}
        assert len(parents) == 1 and client.get_run(parents.pop()).info.run_name == "pool"
        assert (REPO / "artifacts" / "tiny").exists() == repo_had_tiny  # the checkout was not written to
    finally:
        procs.stop_all()
