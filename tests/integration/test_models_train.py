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


def test_checkpoint_from_another_schema_trains_fresh(income, tmp_path, caplog):
    """A checkpoint written for another data schema is stale work: ignored (the log names the schema
    change), never resumed; one that fits the record but not the model is still an error."""
    schema, data = income
    cfg = FAST.model_copy(update={"max_epochs": 1})
    torch.manual_seed(3)
    model = build_model(SPECS[0], schema)
    init = copy.deepcopy(model.state_dict())
    Trainer(model, cfg, checkpoint_dir=tmp_path, fingerprint="aaaa", progress=False).fit(data["train"], data["val"])
    again = build_model(SPECS[0], schema)
    again.load_state_dict(init)
    with caplog.at_level("WARNING", logger="emm.train.trainer"):
        result = Trainer(again, cfg.model_copy(update={"max_epochs": 2}), checkpoint_dir=tmp_path, fingerprint="bbbb",
                         progress=False).fit(data["train"], data["val"], resume=True)
    assert "not resuming" in caplog.text and "schema 'aaaa' -> 'bbbb'" in caplog.text
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["state"]["epoch"] == 2
    other = build_model(SPECS[2], schema)  # a DCN cannot take an MLP's checkpoint
    with pytest.raises(EMMError, match=r"does not fit this model's architecture"):
        Trainer(other, cfg.model_copy(update={"max_epochs": 2}), checkpoint_dir=tmp_path, fingerprint="bbbb",
                progress=False).fit(data["train"], data["val"], resume=True)


def _fit_from(init: dict, schema, data, cfg: TrainConfig, folder, *, resume: bool = False, made_from=None):
    model = build_model(SPECS[0], schema)
    model.load_state_dict(init)
    trainer = Trainer(model, cfg, checkpoint_dir=folder, made_from=made_from, progress=False)
    return model, trainer, trainer.fit(data["train"], data["val"], resume=resume)


def test_resume_after_settings_changed_trains_fresh_at_the_new_lr(income, tmp_path, caplog):
    """Changing lr and resuming must not continue the old run (the optimizer state carries the old lr):
    the result is a fresh run under the new settings, bit for bit."""
    schema, data = income
    torch.manual_seed(4)
    init = copy.deepcopy(build_model(SPECS[0], schema).state_dict())
    old = FAST.model_copy(update={"max_epochs": 2, "lr": 5e-3})
    new = FAST.model_copy(update={"max_epochs": 3, "lr": 1e-3})
    _fit_from(init, schema, data, old, tmp_path / "run")
    with caplog.at_level("WARNING", logger="emm.train.trainer"):
        resumed, trainer, result = _fit_from(init, schema, data, new, tmp_path / "run", resume=True)
    assert "train.lr 0.005 -> 0.001" in caplog.text
    assert trainer.optimizer.param_groups[0]["lr"] == 1e-3
    saved = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 1e-3 and saved["state"]["epoch"] == 3
    fresh, _, fresh_result = _fit_from(init, schema, data, new, tmp_path / "fresh")
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.history == fresh_result.history
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_resume_checks_the_callers_made_from_and_a_lowered_max_epochs(income, tmp_path, caplog):
    """The caller's record (say, an upstream digest) must match too; and a checkpoint past a lowered
    max_epochs is one a run with that cap never reached. Both train fresh."""
    schema, data = income
    torch.manual_seed(5)
    init = copy.deepcopy(build_model(SPECS[0], schema).state_dict())
    other_init = copy.deepcopy(build_model(SPECS[0], schema).state_dict())
    cfg = FAST.model_copy(update={"max_epochs": 2, "patience": 10})
    _fit_from(init, schema, data, cfg, tmp_path / "a", made_from={"pool": "old"})
    with caplog.at_level("WARNING", logger="emm.train.trainer"):
        _, _, result = _fit_from(init, schema, data, cfg.model_copy(update={"max_epochs": 1}), tmp_path / "a",
                                 resume=True, made_from={"pool": "old"})
    assert "past max_epochs 1" in caplog.text and result.epochs_run == 1 and len(result.history) == 1

    _fit_from(init, schema, data, cfg, tmp_path / "b", made_from={"pool": "old"})
    caplog.clear()
    with caplog.at_level("WARNING", logger="emm.train.trainer"):
        resumed, _, _ = _fit_from(other_init, schema, data, cfg, tmp_path / "b", resume=True,
                                  made_from={"pool": "new"})
    assert "pool 'old' -> 'new'" in caplog.text
    fresh, _, _ = _fit_from(other_init, schema, data, cfg, tmp_path / "c", made_from={"pool": "new"})
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_output_width_mismatch_is_named(splits):
    schema, data = splits
    with pytest.raises(EMMError, match=r"returns 1 output\(s\) per row but the data has 2 task\(s\)"):
        Trainer(build_model(SPECS[0], schema), FAST, progress=False).fit(data["train"], data["val"])
