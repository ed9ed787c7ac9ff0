"""The model zoo and the trainer on real Census rows: losses fall, early stopping, exact resume, NaN guard."""

from __future__ import annotations

import copy

import pytest
import torch

from emm.pipeline.params import TrainConfig
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.models.baselines.mmoe import build_mmoe
from emm.models.single_task import ModelSpec, build_model
from emm.train.trainer import CHECKPOINT, Trainer

SPECS = [
    ModelSpec(name="mlp", task="income", arch="mlp", hidden=[32, 16]),
    ModelSpec(name="deep", task="income", arch="mlp", hidden=[32, 32, 16], batchnorm=True),
    ModelSpec(name="dcn", task="income", arch="dcn", hidden=[32, 16], cross_layers=2),
    ModelSpec(name="res", task="income", arch="resmlp", hidden=[32, 16], residual_blocks=2),
]
FAST = TrainConfig(batch_size=256, max_epochs=3, patience=2, device="cpu")


@pytest.fixture(scope="module")
def splits(census_small_data):
    schema = Schema.load(census_small_data)
    return schema, {s: load_split(census_small_data, s, schema) for s in ("train", "val", "test")}


@pytest.fixture(scope="module")
def income(splits):
    """The income task only: what a single-task model trains on."""
    schema, data = splits
    return schema, {k: v.select_tasks(["income"]) for k, v in data.items()}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_each_architecture_learns(spec, splits):
    schema, data = splits
    train = data["train"].select_tasks(["income"])
    torch.manual_seed(0)
    model = build_model(spec, schema)
    assert model(train.sparse[:5], train.dense[:5]).shape == (5, 1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = slice(0, 1024)
    first = None
    for _ in range(30):
        loss = loss_fn(model(train.sparse[batch], train.dense[batch]), train.labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first


def test_multi_task_training_beats_chance(splits):
    schema, data = splits
    trainer = Trainer(build_mmoe(schema, n_experts=4), FAST.model_copy(update={"max_epochs": 4, "lr": 3e-3, "patience": 4}), progress=False)
    result = trainer.fit(data["train"], data["val"])
    metrics = trainer.evaluate(data["test"])
    assert set(metrics) == {"income", "marital"}
    assert metrics["marital"]["auc"] > 0.9 and metrics["income"]["auc"] > 0.85
    assert result.epochs_run == 4 and len(result.history) == 4
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_early_stopping_restores_best_weights(splits):
    """Labels shuffled against the features: validation AUC cannot keep improving, training stops early."""
    schema, data = splits
    train = data["train"].select_tasks(["income"])
    val = data["val"].select_tasks(["income"])
    val.labels = val.labels[torch.randperm(len(val), generator=torch.Generator().manual_seed(0))]
    model = build_model(SPECS[0], schema)
    cfg = FAST.model_copy(update={"max_epochs": 30, "patience": 2, "lr": 1e-2})
    result = Trainer(model, cfg, progress=False).fit(train, val)
    assert result.stopped_early and result.epochs_run < 30
    assert result.epochs_run == result.best_epoch + cfg.patience
    best_auc = max(h["val_auc"] for h in result.history)
    assert result.best_val_auc == pytest.approx(best_auc)
    # the model now holds the best epoch's weights: its val AUC is the best one, not the last one
    auc_now = Trainer(model, cfg, progress=False).evaluate(val)["income"]["auc"]
    assert auc_now == pytest.approx(best_auc, abs=1e-9)


def test_resume_after_kill_gives_identical_weights(income, tmp_path):
    schema, data = income
    spec = SPECS[1]  # BatchNorm + Dropout: exercises buffers and the dropout RNG
    spec = spec.model_copy(update={"dropout": 0.2})
    cfg = FAST.model_copy(update={"max_epochs": 4, "patience": 10})

    torch.manual_seed(1)
    uninterrupted = build_model(spec, schema)
    init = copy.deepcopy(uninterrupted.state_dict())
    Trainer(uninterrupted, cfg, checkpoint_dir=tmp_path / "a", progress=False).fit(data["train"], data["val"])

    killed = build_model(spec, schema)
    killed.load_state_dict(init)
    Trainer(killed, cfg.model_copy(update={"max_epochs": 2}), checkpoint_dir=tmp_path / "b",
            progress=False).fit(data["train"], data["val"])  # "killed" after epoch 2
    resumed = build_model(spec, schema)  # a new process: fresh model object
    result = Trainer(resumed, cfg, checkpoint_dir=tmp_path / "b", progress=False).fit(
        data["train"], data["val"], resume=True)
    assert result.epochs_run == 4 and [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(income, tmp_path):
    schema, data = income
    model = build_model(SPECS[0], schema)
    cfg = FAST.model_copy(update={"max_epochs": 1})
    Trainer(model, cfg, checkpoint_dir=tmp_path, progress=False).fit(data["train"], data["val"])
    bad = copy.copy(data["train"])
    bad.dense = bad.dense.clone()
    bad.dense[:, 0] = float("nan")
    with pytest.raises(EMMError, match=r"loss became nan at epoch 2, step 0; the last good checkpoint \(after "
                                       r"epoch 1\) is kept"):
        Trainer(model, cfg.model_copy(update={"max_epochs": 2}), checkpoint_dir=tmp_path,
                progress=False).fit(bad, data["val"], resume=True)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["state"]["epoch"] == 1


def test_checkpoint_from_another_schema_is_refused(income, tmp_path):
    schema, data = income
    model = build_model(SPECS[0], schema)
    cfg = FAST.model_copy(update={"max_epochs": 1})
    Trainer(model, cfg, checkpoint_dir=tmp_path, fingerprint="aaaa", progress=False).fit(data["train"], data["val"])
    with pytest.raises(EMMError, match=r"written for data schema aaaa, but the data now has schema bbbb"):
        Trainer(model, cfg, checkpoint_dir=tmp_path, fingerprint="bbbb", progress=False).fit(
            data["train"], data["val"], resume=True)
    other = build_model(SPECS[2], schema)  # a DCN cannot take an MLP's checkpoint
    with pytest.raises(EMMError, match=r"does not fit this model's architecture"):
        Trainer(other, cfg, checkpoint_dir=tmp_path, fingerprint="aaaa", progress=False).fit(
            data["train"], data["val"], resume=True)


def test_output_width_mismatch_is_named(splits):
    schema, data = splits
    with pytest.raises(EMMError, match=r"returns 1 output\(s\) per row but the data has 2 task\(s\)"):
        Trainer(build_model(SPECS[0], schema), FAST, progress=False).fit(data["train"], data["val"])
