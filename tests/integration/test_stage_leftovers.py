"""What a killed or failing stage leaves behind: no eval/ describing a registration that did not happen,
and no MLflow run RUNNING forever after its process died. And the fuse stage's optional fine-tune phase on
the same small pool: it keeps phase 1's best unless validation improved, records which it kept, and logs
its MLflow steps after phase 1's."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from emm.errors import EMMError
from emm.fusion.options import DecomposeConfig
from emm.io import read_json
from emm.pipeline import evaluate as evaluate_module
from emm.pipeline.decompose import decompose_pool
from emm.pipeline.fuse import fuse
from emm.pipeline.params import FuseConfig, PretrainConfig, TrackingConfig, TrainConfig
from emm.pipeline.pretrain import pretrain
from emm.tracking.runs import PID_TAG, open_run, start_detached_run
from emm.tracker import NullTracker
from emm.tracking.store import configure, registered_name

TRAIN = TrainConfig(batch_size=512, max_epochs=1, patience=1, lr=5e-3, device="cpu")
POOL = [{"name": f"{t}-{a}", "task": t, "arch": a, "hidden": [8, 4]} for t in ("income", "marital")
        for a in ("mlp", "resmlp")]


@pytest.fixture(scope="module")
def fused(census_small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("leftovers")
    pretrain("census-income", census_small_data, root / "pool", root / "pool-work",
             PretrainConfig(train=TRAIN, pool={"census-income": POOL}), progress=False)
    decompose_pool(census_small_data, root / "pool", root / "components", DecomposeConfig())
    fuse("census-income", census_small_data, root / "pool", root / "components", root / "fused", root / "fused-work",
         FuseConfig(train=TRAIN, tower=[4]), DecomposeConfig(), progress=False)
    return root


def test_failed_registration_leaves_no_new_eval_folder(fused, census_small_data, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = TrackingConfig(store=fused / "mlruns", log_models=False)
    first = evaluate_module.evaluate("census-income", census_small_data, fused / "pool", fused / "fused",
                                     fused / "eval", tracking=tracking)
    assert read_json(fused / "eval" / "metrics.json")["registered_version"] == first["registered_version"]

    def registry_down(*args, **kwargs):
        raise EMMError("the registry is down")

    monkeypatch.setattr(evaluate_module, "register_fused", registry_down)
    with pytest.raises(EMMError, match="registry is down"):
        evaluate_module.evaluate("census-income", census_small_data, fused / "pool", fused / "fused",
                                 fused / "eval", tracking=tracking)
    # the previous, complete eval/ is still there; no half-made sibling either
    assert read_json(fused / "eval" / "metrics.json")["registered_version"] == first["registered_version"]
    assert not [p for p in fused.iterdir() if p.name.startswith(".eval.")]


def test_runs_of_dead_processes_are_marked_killed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlruns"
    # a run left RUNNING by a process that is gone (as after kill -9)
    code = ("from emm.tracking.runs import start_detached_run; import pathlib, sys; "
            f"print(start_detached_run('census-income', pathlib.Path({str(store)!r}), 'fused-full'))")
    orphan = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1]
    configure(store)
    client = mlflow.MlflowClient()
    assert client.get_run(orphan).info.status == "RUNNING"
    live = start_detached_run("census-income", store, "pool")  # this process is alive: never touched
    with open_run("census-income", store, "fused-full") as tracker:
        assert client.get_run(orphan).info.status == "KILLED"
        assert client.get_run(live).info.status == "RUNNING"
        assert client.get_run(tracker.run_id).data.tags[PID_TAG].isdigit()
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert mlflow.get_experiment_by_name(registered_name("census-income")) is not None


class StepRecorder(NullTracker):
    """Keeps the step of every per-epoch metric logged."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log_metrics(self, metrics, step=None) -> None:
        if step is not None:
            self.steps.append(step)


def test_the_finetune_phase_starts_from_phase_one_and_never_ends_worse_on_validation(fused, census_small_data):
    from emm.fusion.saved import FUSED_JSON

    train = TRAIN.model_copy(update={"max_epochs": 2, "patience": 2})
    tracker = StepRecorder()
    out = fuse("census-income", census_small_data, fused / "pool", fused / "components", fused / "fused-ft",
               fused / "fused-ft-work", FuseConfig(train=train, tower=[4], output="donor_residual",
                                                    finetune_lr_scale=0.1), DecomposeConfig(), progress=False,
               tracker=tracker)
    assert tracker.steps == list(range(1, out.fit.epochs_run + 1))  # the fine-tune's epochs log on, not from 1
    meta = read_json(fused / "fused-ft" / FUSED_JSON)
    ft = meta["finetune"]
    assert ft["lr"] == pytest.approx(train.lr * 0.1) and ft["thawed_params"] > 0
    assert ft["first_phase_epochs"] == 2 and ft["best_val_auc"] >= ft["first_phase_best_val_auc"]
    assert [r["epoch"] for r in out.fit.history] == list(range(0, out.fit.epochs_run + 1))  # epochs numbered on
    assert [r.get("phase") for r in out.fit.history][3:] == ["finetune"] * (out.fit.epochs_run - 2)
    assert (ft["kept"] == "finetune") == (out.fit.best_epoch > 2)
    assert out.fit.best_val_auc == pytest.approx(ft["best_val_auc"])
    assert meta["trainable_params"] > 0 and all(p.requires_grad for p in out.model.donors.parameters())
