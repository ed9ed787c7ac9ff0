"""Resuming must never pass stale work off as new, on real Census rows: a checkpoint made from other
settings or another pool trains fresh (and says why) in ``emm pretrain``, ``emm fuse`` and the Prefect
per-model stage."""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator, Mapping

import torch
import yaml
from safetensors.torch import load_file

from emm.data.schema import Schema
from emm.fusion.fused import build_fused
from emm.fusion.saved import load_fused
from emm.pipeline.decompose import decompose_pool, load_pool_plan
from emm.pipeline.fuse import fuse
from emm.pipeline.params import DecomposeConfig, FuseConfig, PretrainConfig, TrainConfig
from emm.pipeline.pretrain import pretrain, pretrain_model_stage
from emm.tracker import NullTracker
from emm.train.trainer import CHECKPOINT

POOL = [
    {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16, 8]},
    {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16, 8]},
]
TRAIN = TrainConfig(batch_size=512, max_epochs=2, patience=5, lr=5e-3, device="cpu")


class StepRecorder(NullTracker):
    """Records the epochs the trainer logged: a fresh run logs 1, 2, ...; a resumed one only the rest."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None and "val_auc" in metrics:
            self.steps.append(step)

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[StepRecorder]:
        yield self


def _pool_cfg(train: TrainConfig, pool: list[dict] = POOL) -> PretrainConfig:
    return PretrainConfig(train=train, pool={"census-income": pool})


def test_pretrain_resume_after_lr_change_trains_fresh_at_the_new_lr(census_small_data, tmp_path, caplog):
    one = POOL[:1]
    pretrain("census-income", census_small_data, tmp_path / "pool", tmp_path / "work", _pool_cfg(TRAIN, one),
             progress=False)
    changed = TRAIN.model_copy(update={"lr": 1e-3, "max_epochs": 3})
    recorder = StepRecorder()
    with caplog.at_level("WARNING", logger="emm.train.trainer"):
        [entry] = pretrain("census-income", census_small_data, tmp_path / "pool", tmp_path / "work",
                           _pool_cfg(changed, one), resume=True, tracker=recorder, progress=False)
    assert "income-mlp: not resuming" in caplog.text and "train.lr 0.005 -> 0.001" in caplog.text
    assert recorder.steps == [1, 2, 3] and entry.epochs_run == 3
    saved = torch.load(tmp_path / "work" / "income-mlp" / "checkpoint" / CHECKPOINT, weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 1e-3
    # what was resumed is exactly a fresh run under the new settings
    [fresh] = pretrain("census-income", census_small_data, tmp_path / "pool-fresh", tmp_path / "work-fresh",
                       _pool_cfg(changed, one), progress=False)
    assert (entry.val_auc, entry.test_auc) == (fresh.val_auc, fresh.test_auc)
    got, want = load_file(tmp_path / "pool" / entry.weights), load_file(tmp_path / "pool-fresh" / fresh.weights)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}


def test_fuse_resume_after_the_pool_was_retrained_uses_the_new_pool(census_small_data, tmp_path, caplog):
    """The fuse checkpoint holds the frozen components: resuming one made from the old pool would carry
    that pool into the new fused/. It must train fresh on the new pool's components."""
    root, data = tmp_path, census_small_data
    fcfg, dcfg = FuseConfig(train=TRAIN, tower=[4]), DecomposeConfig()
    schema = Schema.load(data)

    def pool_and_components(seed: int) -> None:
        pretrain("census-income", data, root / "pool", root / "pool-work",
                 _pool_cfg(TRAIN.model_copy(update={"seed": seed})), progress=False)
        decompose_pool(data, root / "pool", root / "components", dcfg)

    def fuse_into(out: str, work: str, resume: bool = False):
        return fuse("census-income", data, root / "pool", root / "components", root / out, root / work, fcfg, dcfg,
                    resume=resume, progress=False)

    pool_and_components(seed=1)
    fuse_into("fused", "fused-work")
    old_frozen = _frozen_state(load_fused(root / "fused", schema)[0])
    pool_and_components(seed=2)  # retrained and decomposed again: new components, same shapes
    with caplog.at_level("WARNING", logger="emm.train.trainer"):
        result = fuse_into("fused", "fused-work", resume=True)
    assert "not resuming" in caplog.text
    assert re.search(r"components '[0-9a-f]+' -> '[0-9a-f]+'; .*pool '[0-9a-f]+' -> '[0-9a-f]+'", caplog.text)
    assert result.fit.epochs_run == TRAIN.max_epochs

    plan, entries = load_pool_plan(data, root / "pool", root / "components", dcfg)
    expected = _frozen_state(build_fused(plan, [e.task for e in entries], schema.task_names, fcfg.akf, schema))
    saved = _frozen_state(load_fused(root / "fused", schema)[0])
    # the saved model may be pruned (a branch that adds exactly zero is left out): what it keeps must match
    assert saved and saved.keys() <= expected.keys() and expected.keys() == old_frozen.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)
    assert not all(torch.equal(saved[k], old_frozen[k]) for k in saved)  # the two pools do differ
    # and the whole model is what an uninterrupted fuse on the new pool gives
    fresh = fuse_into("fused-fresh", "fused-fresh-work")
    assert result.test == fresh.test
    new_state, fresh_state = load_fused(root / "fused", schema)[0].state_dict(), fresh.saved.state_dict()
    assert new_state.keys() == fresh_state.keys()
    assert all(torch.equal(new_state[k], fresh_state[k].cpu()) for k in fresh_state)


def _stage_params(root, train: dict) -> str:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({
        "paths": {"artifacts": str(root / "artifacts")}, "tracking": {"store": str(root / "mlruns")},
        "pretrain": {"train": {"device": "cpu", "batch_size": 512, "patience": 5, **train},
                     "pool": {"census-income": POOL}},
    }))
    return str(path)


def test_per_model_stage_after_settings_changed_trains_fresh(census_small_data, tmp_path):
    """The Prefect per-model stage always asks to resume: a changed seed and lower max_epochs must give
    a fresh model honouring them, not the previous weights with their epoch count."""
    for root in (tmp_path / "a", tmp_path / "b"):
        shutil.copytree(census_small_data, root / "artifacts" / "census-income" / "data")
    first = _stage_params(tmp_path / "a", {"lr": 5e-3, "max_epochs": 3, "seed": 1})
    assert pretrain_model_stage("census-income", first, "income-mlp", track=False)["epochs_run"] == 3
    changed = {"lr": 1e-3, "max_epochs": 2, "seed": 2}
    entry = pretrain_model_stage("census-income", _stage_params(tmp_path / "a", changed), "income-mlp", track=False)
    fresh = pretrain_model_stage("census-income", _stage_params(tmp_path / "b", changed), "income-mlp", track=False)
    assert entry["epochs_run"] == 2 and entry["best_epoch"] <= 2
    assert {k: v for k, v in entry.items() if k != "seconds"} == {k: v for k, v in fresh.items() if k != "seconds"}
    weights = "artifacts/census-income/pool-work/income-mlp/weights.safetensors"
    got, want = load_file(tmp_path / "a" / weights), load_file(tmp_path / "b" / weights)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_pretrain_resume_with_a_raised_max_epochs_continues_exactly(census_small_data, tmp_path):
    """max_epochs is the one setting a checkpoint may differ in (raised): continuing it is the same as
    training uninterrupted with the new cap, so it is resumed rather than retrained."""
    short, full = 2, 3
    one = POOL[:1]
    pretrain("census-income", census_small_data, tmp_path / "pool", tmp_path / "work",
             _pool_cfg(TRAIN.model_copy(update={"max_epochs": short}), one), progress=False)
    recorder = StepRecorder()
    longer = _pool_cfg(TRAIN.model_copy(update={"max_epochs": full}), one)
    [entry] = pretrain("census-income", census_small_data, tmp_path / "pool", tmp_path / "work", longer,
                       resume=True, tracker=recorder, progress=False)
    assert recorder.steps == list(range(short + 1, full + 1))
    [fresh] = pretrain("census-income", census_small_data, tmp_path / "pool-b", tmp_path / "work-b", longer,
                       progress=False)
    got, want = load_file(tmp_path / "pool" / entry.weights), load_file(tmp_path / "pool-b" / fresh.weights)
    assert all(torch.equal(got[k], want[k]) for k in want)
