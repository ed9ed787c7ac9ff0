"""A registry version is tagged and aliased completely, or removed: never left half-registered; and two
evaluations of one fused model at once register it once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from emm.fusion.saved import FUSED_WEIGHTS
from emm.io import sha256_file
from emm.pipeline.decompose import decompose_pool
from emm.pipeline.evaluate import evaluate
from emm.pipeline.fuse import fuse
from emm.pipeline.params import DecomposeConfig, FuseConfig, PretrainConfig, TrainConfig
from emm.pipeline.pretrain import pretrain
from tests.conftest import REPO

DATASET = "census-income"
POOL = [{"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [8]},
        {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [8]}]
TRAIN = TrainConfig(batch_size=512, max_epochs=1, patience=1, lr=1e-2, device="cpu")
DECOMPOSE = DecomposeConfig(example_rows=64)


@dataclass
class TinyFused:
    data_dir: Path
    fused_dir: Path
    eval_dir: Path   # metrics.json and plots/auc.png of an evaluation that registered nothing


@pytest.fixture(scope="module")
def tiny_fused(census_small_data, tmp_path_factory) -> TinyFused:
    """A fused model of a two-model pool (one epoch each, untracked) and its unregistered evaluation."""
    root = tmp_path_factory.mktemp("tiny-fused")
    pretrain(DATASET, census_small_data, root / "pool", root / "pool-work",
             PretrainConfig(train=TRAIN, pool={DATASET: POOL}), progress=False)
    decompose_pool(census_small_data, root / "pool", root / "components", DECOMPOSE)
    fuse(DATASET, census_small_data, root / "pool", root / "components", root / "fused", root / "fused-work",
         FuseConfig(tower=[4], train=TRAIN), DECOMPOSE, progress=False)
    evaluate(DATASET, census_small_data, root / "pool", root / "fused", root / "eval")
    return TinyFused(census_small_data, root / "fused", root / "eval")


def test_failed_tagging_deletes_the_version(tmp_path: Path) -> None:
    from emm.tracking import registry as mt
    from emm.tracking.store import configure

    configure(tmp_path / "mlruns")
    client = mlflow.MlflowClient()
    client.create_registered_model("emm-test")
    good = client.create_model_version("emm-test", source=str(tmp_path), run_id=None)
    mt.tag_version("emm-test", good.version, {mt.SCORE_TAG: "0.9"})
    assert client.get_model_version_by_alias("emm-test", mt.CHALLENGER).version == good.version

    bad = client.create_model_version("emm-test", source=str(tmp_path), run_id=None)
    with pytest.raises(Exception):
        mt.tag_version("emm-test", bad.version, {mt.SCORE_TAG: "0.95", "x" * 300: "too long a key"})
    versions = {v.version for v in client.search_model_versions("name='emm-test'")}
    assert versions == {good.version}  # the half-tagged version is gone, the good one untouched
    assert client.get_model_version_by_alias("emm-test", mt.CHALLENGER).version == good.version


# One registering process: it waits at a barrier (its own file written, the other's awaited) so that both
# reach register_fused together, then prints the version it got and whether it reused one.
REGISTER = """
import json, sys, time
from pathlib import Path
from emm.io import read_json
from emm.pipeline.params import TrackingConfig
from emm.pipeline.register import register_fused

data_dir, fused_dir, eval_dir, store, mine, other = map(Path, sys.argv[1:7])
summary = read_json(eval_dir / "metrics.json")
mine.touch()
deadline = time.monotonic() + 120
while not other.exists():
    if time.monotonic() > deadline:
        sys.exit("the other process never reached the barrier")
    time.sleep(0.005)
version = register_fused("census-income", data_dir, fused_dir, eval_dir, summary, TrackingConfig(store=store))
print(json.dumps({"version": version, "reused": summary["registered_reused"]}))
"""


@pytest.mark.parametrize("store_exists", [True, False], ids=["store-of-the-fuse-run", "no-store-yet"])
def test_two_evaluations_at_once_register_one_version(tiny_fused, tmp_path, store_exists):
    """Two processes register the same fused model at the same moment: one registers it, the other reuses
    that version; the registry holds exactly one version, tagged with the fused weights' sha256. Also when
    neither finds a store yet (a fuse run without tracking): they must not both create its tables."""
    from emm.tracking.store import configure, use_experiment

    store = tmp_path / "mlruns"
    if store_exists:
        with pytest.MonkeyPatch.context() as mp:  # as the fuse run left it
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            use_experiment(DATASET, store)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true")
    gates = [tmp_path / "ready-a", tmp_path / "ready-b"]
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, str(tiny_fused.data_dir), str(tiny_fused.fused_dir),
                               str(tiny_fused.eval_dir), str(store), str(gates[i]), str(gates[1 - i])],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"a registering process failed ({p.returncode}):\n{out}\n{err}"
    said = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        configure(store)
        versions = mlflow.MlflowClient().search_model_versions(f"name = 'emm-{DATASET}'")
    assert [str(v.version) for v in versions] == ["1"], [(v.version, v.tags) for v in versions]
    assert {s["version"] for s in said} == {"1"} and sorted(s["reused"] for s in said) == [False, True], said
    assert versions[0].tags["fused_sha256"] == sha256_file(tiny_fused.fused_dir / FUSED_WEIGHTS)


def test_the_registration_lock_lives_beside_the_store(tmp_path, monkeypatch):
    from emm.tracking import registry as mt

    store, db = tmp_path / "mlruns", tmp_path / "elsewhere" / "my.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mt.lock_path("emm-x", store) == store.resolve() / ".emm-registry-emm-x.lock"  # <store>/mlflow.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert mt.lock_path("emm-x", store) == db.parent / ".emm-registry-emm-x.lock"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "files").as_uri())
    assert mt.lock_path("emm-x", store) == tmp_path / "files" / ".emm-registry-emm-x.lock"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "plain"))
    assert mt.lock_path("emm-x", store) == tmp_path / "plain" / ".emm-registry-emm-x.lock"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    server = mt.lock_path("emm-x", store)
    assert server.name.endswith(".emm-registry-emm-x.lock") and store not in server.parents


def test_a_held_registration_lock_is_waited_for_and_named(tmp_path, monkeypatch):
    """While another holder has it, a registration waits, and after ``wait_s`` says which lock and why."""
    from emm.errors import EMMError
    from emm.tracking import registry as mt

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlruns"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(60)",
                               str(mt.lock_path("emm-x", store))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(EMMError, match=r"waited 1 s for .*\.emm-registry-emm-x\.lock: another process .* is still "
                                           r"registering 'emm-x'"):
            with mt.registration_lock("emm-x", store, wait_s=1):
                pass
    finally:
        holder.kill()
        holder.wait()
    with mt.registration_lock("emm-x", store):  # the OS released the dead holder's lock
        pass
