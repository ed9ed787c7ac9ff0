"""Missing labels (NaN) in the train layer: the masked loss, masked metrics, compare's refusals, LightGBM."""

from __future__ import annotations

import copy
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.train.compare import WeightedAUC, fit_stack, paired_auc_ci, paired_auc_cis, stack, weighted_auc
from emm.train.metrics import mean_auc, task_metrics
from emm.train.options import TrainConfig
from emm.train.predict import predict_proba
from emm.train.trainer import Trainer, masked_bce

TASKS = ["rich", "scarce"]


class Heads(nn.Module):
    """A shared layer and one linear head per task: a task's gradient reaches its own head only."""

    def __init__(self, n_dense: int = 4, tasks: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(n_dense, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(tasks))

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(dense))
        return torch.cat([head(h) for head in self.heads], dim=1)


def split(n: int, seed: int, keep_scarce: float = 1.0, noise: float = 0.5) -> SplitTensors:
    """Two tasks on dense features (rich: x0 + x1, scarce: x0 - x2); ``keep_scarce`` of the scarce labels kept."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    z = torch.stack([x[:, 0] + x[:, 1], x[:, 0] - x[:, 2]], dim=1) + noise * torch.randn(n, 2, generator=g)
    labels = (z > 0).float()
    if keep_scarce < 1.0:
        labels[torch.rand(n, generator=g) >= keep_scarce, 1] = math.nan
    return SplitTensors(torch.zeros(n, 0, dtype=torch.long), x, labels, list(TASKS))


# ---- the loss -------------------------------------------------------------------------------------------------
def test_masked_loss_equals_the_loss_on_each_tasks_labelled_rows_and_so_do_its_gradients():
    data = split(400, seed=1, keep_scarce=0.1)
    labelled = ~torch.isnan(data.labels[:, 1])
    assert 10 < int(labelled.sum()) < 80  # the scarce task really is partly labelled
    model = Heads()
    loss, stats = masked_bce(model(data.sparse, data.dense), data.labels, torch.isnan(data.labels))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    ref_model = copy.deepcopy(model)
    logits = ref_model(data.sparse, data.dense)
    bce = nn.BCEWithLogitsLoss()
    reference = bce(logits[:, 0], data.labels[:, 0]) + bce(logits[labelled, 1], data.labels[labelled, 1])
    ref_grads = torch.autograd.grad(reference, list(ref_model.parameters()))

    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the reported figures: the BCE sum and count of the labelled entries
    assert float(stats[1]) == 400 + int(labelled.sum())
    per_entry = nn.BCEWithLogitsLoss(reduction="sum")
    want_sum = per_entry(logits[:, 0], data.labels[:, 0]) + per_entry(logits[labelled, 1], data.labels[labelled, 1])
    assert float(stats[0]) == pytest.approx(float(want_sum.detach()), rel=1e-6)


def test_a_task_without_labelled_rows_in_the_batch_adds_nothing_and_no_gradient_to_its_head():
    data = split(64, seed=2)
    data.labels[:, 1] = math.nan
    model = Heads()
    logits = model(data.sparse, data.dense)
    loss, stats = masked_bce(logits, data.labels, torch.isnan(data.labels))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats).all()
    torch.testing.assert_close(loss, nn.BCEWithLogitsLoss()(logits[:, 0], data.labels[:, 0]))
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.heads[1].parameters())
    assert all(torch.count_nonzero(p.grad) > 0 for p in model.heads[0].parameters())
    assert float(stats[1]) == 64


def test_with_every_label_present_a_training_step_is_the_historical_one():
    """The loss, its gradients and the weights after one Adam step of ``Trainer.train_epoch`` equal those of
    the loss the trainer always used: ``BCEWithLogitsLoss`` (mean over B x T) times T."""
    data = split(256, seed=3)
    cfg = TrainConfig(batch_size=256, device="cpu", lr=1e-2)
    model, ref = Heads(), Heads()
    ref.load_state_dict(model.state_dict())

    logits = model(data.sparse, data.dense)
    loss, _ = masked_bce(logits, data.labels, torch.isnan(data.labels))
    reference = nn.BCEWithLogitsLoss()(ref(data.sparse, data.dense), data.labels) * 2
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-7)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_grads = torch.autograd.grad(reference, list(ref.parameters()))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)

    trainer = Trainer(model, cfg, progress=False)
    reported = trainer.train_epoch(data, epoch=1)  # one batch: every row, in a shuffled order
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt.zero_grad()
    step_loss = nn.BCEWithLogitsLoss()(ref(data.sparse, data.dense), data.labels) * 2
    step_loss.backward()
    opt.step()
    for (name, got), want in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=name)
    assert reported == pytest.approx(float(step_loss.detach()) / 2, rel=1e-6)  # per label, not per row


def test_the_nan_guard_ignores_missing_labels_but_not_a_nan_on_a_labelled_row():
    data = split(300, seed=4, keep_scarce=0.05)
    trainer = Trainer(Heads(), TrainConfig(batch_size=64, device="cpu"), progress=False)
    assert math.isfinite(trainer.train_epoch(data, epoch=1))
    bad = copy.copy(data)
    bad.dense = data.dense.clone()
    bad.dense[:, 0] = math.nan
    with pytest.raises(EMMError, match="loss became nan"):
        trainer.train_epoch(bad, epoch=2)


def test_distillation_keeps_missing_labels_missing():
    from emm.train.distill import Distillation

    data = split(8, seed=5, keep_scarce=0.5)
    targets = Distillation(Heads(seed=9), 0.3).targets(data.sparse, data.dense, data.labels)
    assert torch.equal(torch.isnan(targets), torch.isnan(data.labels))


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_task_metrics_score_each_task_on_its_labelled_rows():
    rng = np.random.default_rng(6)
    n = 500
    labels = (rng.random((n, 3)) < 0.4).astype(np.float32)
    probs = rng.random((n, 3)).astype(np.float32)
    labels[rng.random(n) < 0.7, 1] = np.nan   # partly labelled
    labels[:, 2] = np.nan                      # not labelled at all
    labels[:5, 2] = 1.0                        # ... but five rows, all positive: one class
    m = task_metrics(labels, probs, ["a", "b", "c"])
    keep = ~np.isnan(labels[:, 1])
    assert m["a"]["labelled"] == n and m["b"]["labelled"] == int(keep.sum()) and m["c"]["labelled"] == 5
    assert m["a"]["auc"] == pytest.approx(roc_auc_score(labels[:, 0], probs[:, 0]), abs=1e-12)
    assert m["b"]["auc"] == pytest.approx(roc_auc_score(labels[keep, 1], probs[keep, 1]), abs=1e-12)
    assert m["b"]["logloss"] == pytest.approx(log_loss(labels[keep, 1], probs[keep, 1].astype(np.float64)), rel=1e-9)
    assert math.isnan(m["c"]["auc"]) and math.isfinite(m["c"]["logloss"])
    assert mean_auc(m) == pytest.approx((m["a"]["auc"] + m["b"]["auc"]) / 2)
    labels[:, 2] = np.nan
    none = task_metrics(labels, probs, ["a", "b", "c"])["c"]
    assert none["labelled"] == 0 and math.isnan(none["auc"]) and math.isnan(none["logloss"])


def test_task_metrics_still_refuse_non_finite_scores_on_an_unlabelled_row():
    labels = np.array([[0.0], [1.0], [np.nan], [1.0]], np.float32)
    probs = np.array([[0.1], [0.9], [np.nan], [0.7]], np.float32)
    with pytest.raises(EMMError, match="1 non-finite score"):
        task_metrics(labels, probs, ["a"])


# ---- compare ---------------------------------------------------------------------------------------------------
def _labels_and_scores(n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    y = (rng.random(n) < 0.4).astype(np.float32)
    return y, y + rng.normal(size=n)


REFUSERS = {
    "WeightedAUC.prepare": lambda y, s: WeightedAUC.prepare(y, s),
    "weighted_auc": lambda y, s: weighted_auc(y, s),
    "paired_auc_cis": lambda y, s: paired_auc_cis(y, {"x": [(s, -s)]}, n_resamples=20),
    "paired_auc_ci": lambda y, s: paired_auc_ci(y, s, -s, n_resamples=20),
    "fit_stack": lambda y, s: fit_stack(np.stack([s, -s], 1), y),
    "stack": lambda y, s: stack(np.stack([s, -s], 1), y, np.stack([s, -s], 1)),
}


@pytest.mark.parametrize("name", list(REFUSERS))
def test_compare_refuses_missing_labels_and_labels_that_are_not_binary(name):
    fn = REFUSERS[name]
    y, s = _labels_and_scores()
    fn(y, s)  # 0/1 labels: accepted
    missing = y.copy()
    missing[[3, 50]] = np.nan
    with pytest.raises(EMMError, match=r"2 of 200 labels are missing \(NaN\).*slice to the task's labelled rows first"):
        fn(missing, s)
    other = y.copy()
    other[7] = 2.0
    with pytest.raises(EMMError, match=r"labels must be 0/1, got \[2.0\]"):
        fn(other, s)


def test_fit_stack_takes_a_regularisation_strength_and_keeps_its_default():
    y, s = _labels_and_scores(2000)
    x = np.stack([s, s + np.random.default_rng(8).normal(size=len(s))], axis=1)
    default, same = fit_stack(x, y), fit_stack(x, y, C=1.0)
    np.testing.assert_array_equal(default.coef_, same.coef_)
    strong = fit_stack(x, y, C=1e-4)
    assert np.abs(strong.coef_).sum() < 0.2 * np.abs(default.coef_).sum()
    with pytest.raises(EMMError, match="C must be > 0"):
        fit_stack(x, y, C=0.0)


# ---- the trainer, end to end -------------------------------------------------------------------------------------
def test_fit_on_partly_labelled_splits_trains_and_early_stops_on_the_masked_validation_auc():
    train, val = split(3000, seed=10, keep_scarce=0.1), split(1000, seed=11, keep_scarce=0.3)
    # the scarce task's validation labels are noise: its AUC cannot keep improving, so early stopping must end it
    val.labels[:, 1] = torch.where(torch.isnan(val.labels[:, 1]), val.labels[:, 1],
                                   (torch.rand(len(val), generator=torch.Generator().manual_seed(12)) < 0.5).float())
    val.labels[:, 0] = math.nan  # and the rich task has no validation label at all: early stopping reads the scarce one
    cfg = TrainConfig(batch_size=128, lr=2e-2, max_epochs=40, patience=2, device="cpu")
    model = Heads()
    result = Trainer(model, cfg, progress=False).fit(train, val)
    assert result.stopped_early and result.epochs_run == result.best_epoch + cfg.patience < cfg.max_epochs
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert all(math.isnan(h["val_auc_rich"]) and h["val_auc"] == h["val_auc_scarce"] for h in result.history)
    keep = ~torch.isnan(val.labels[:, 1])
    probs = predict_proba(model, val)
    assert result.best_val_auc == pytest.approx(roc_auc_score(val.labels[keep, 1], probs[keep.numpy(), 1]), abs=1e-9)
    assert result.best_val_auc == max(h["val_auc"] for h in result.history)


def test_a_partly_labelled_task_still_learns_from_its_few_labels():
    train, val = split(4000, seed=13, keep_scarce=0.1), split(1000, seed=14)
    cfg = TrainConfig(batch_size=128, lr=2e-2, max_epochs=6, patience=6, device="cpu")
    trainer = Trainer(Heads(), cfg, progress=False)
    trainer.fit(train, val)
    metrics = trainer.evaluate(val)
    assert metrics["scarce"]["auc"] > 0.85 and metrics["scarce"]["labelled"] == 1000


# ---- LightGBM -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def partly_labelled_dir(tmp_path_factory):
    """A small synthetic table whose 'conversion' keeps 30% of its labels in train/val and 80% in test."""
    pytest.importorskip("lightgbm")
    from emm.data.options import SynthConfig
    from emm.data.synth import synthesize

    out = tmp_path_factory.mktemp("lgb") / "data"
    synthesize(SynthConfig(rows=8000, seed=3, vocab_sizes=[5, 20], val_fraction=0.2, test_fraction=0.2,
                           conversion_given_click=0.5, click_rate=0.4), out)
    rng = np.random.default_rng(0)
    for split_name, keep_share in (("train", 0.3), ("val", 0.3), ("test", 0.8)):
        path = out / f"{split_name}.parquet"
        table = pq.read_table(path)
        y = table.column("conversion").to_numpy()
        keep = rng.random(len(y)) < keep_share
        column = pa.array(y.astype(np.int8), mask=~keep, type=pa.int8())
        pq.write_table(table.set_column(table.column_names.index("conversion"), "conversion", column), path)
    return out


def test_lightgbm_trains_each_task_on_its_labelled_rows_and_scores_every_row(partly_labelled_dir):
    from emm.train.lightgbm_row import lightgbm_per_task

    result = lightgbm_per_task(partly_labelled_dir, rounds=40, early_stop=10, params={"num_threads": 1})
    frames = {s: pq.read_table(partly_labelled_dir / f"{s}.parquet").to_pandas() for s in ("train", "val", "test")}
    y = {s: frames[s]["conversion"].to_numpy(dtype=np.float64, na_value=np.nan) for s in frames}
    keep = {s: ~np.isnan(v) for s, v in y.items()}
    conv, click = result["conversion"], result["click"]
    assert conv["labelled"] == {s: int(k.sum()) for s, k in keep.items()}
    assert click["labelled"] == {s: len(f) for s, f in frames.items()}
    # the same booster, trained by hand on the labelled rows only: identical scores on every test row
    import lightgbm as lgb

    from emm.data.schema import Schema
    from emm.train.lightgbm_row import DEFAULT_PARAMS, lightgbm_features

    categorical, features = lightgbm_features(Schema.load(partly_labelled_dir))
    fit = {s: frames[s][keep[s]] for s in ("train", "val")}
    train = lgb.Dataset(fit["train"][features], fit["train"]["conversion"], categorical_feature=categorical,
                        free_raw_data=False)
    val = lgb.Dataset(fit["val"][features], fit["val"]["conversion"], reference=train, categorical_feature=categorical)
    by_hand = lgb.train({**DEFAULT_PARAMS, "num_threads": 1, "seed": 2026, "metric": "auc"}, train,
                        num_boost_round=40, valid_sets=[val], callbacks=[lgb.early_stopping(10, verbose=False)])
    assert by_hand.best_iteration == conv["best_iteration"]
    np.testing.assert_array_equal(by_hand.predict(frames["test"][features], num_iteration=by_hand.best_iteration),
                                  conv["test_scores"])
    assert len(conv["test_scores"]) == len(frames["test"]) and len(conv["val_scores"]) == len(frames["val"])
    assert conv["test_auc"] == roc_auc_score(y["test"][keep["test"]], conv["test_scores"][keep["test"]])
    assert conv["val_auc"] == roc_auc_score(y["val"][keep["val"]], conv["val_scores"][keep["val"]])
    assert conv["test_auc"] > 0.6


def test_lightgbm_refuses_a_task_with_no_labelled_validation_row(partly_labelled_dir, tmp_path):
    import shutil

    from emm.train.lightgbm_row import lightgbm_per_task

    folder = tmp_path / "data"
    shutil.copytree(partly_labelled_dir, folder)
    table = pq.read_table(folder / "val.parquet")
    empty = pa.nulls(len(table), type=pa.int8())
    pq.write_table(table.set_column(table.column_names.index("conversion"), "conversion", empty), folder / "val.parquet")
    with pytest.raises(EMMError, match=r"task 'conversion' has no labelled row in split 'val'"):
        lightgbm_per_task(folder, rounds=5, early_stop=2, params={"num_threads": 1})
