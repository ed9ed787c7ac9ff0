"""When a fit stops and why (``emm.train.stopping``): patience on the mean validation AUC for every fit, and for a fit
whose start is scored (the fuse stage's donor blend) giving up once no task beat its own start by ``min_delta``; the
reason lands in ``FitResult.stopped``. Pretrain and the baselines keep their settings: the rule is the fuse stage's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from emm.data.tensors import SplitTensors
from emm.fusion.options import FuseOptions
from emm.fusion.procedure import FusePlan, FuseRunner
from emm.pipeline.params import load_params
from emm.train.options import TrainConfig
from emm.train.stopping import MAX_EPOCHS, PATIENCE, START, EarlyStop, beats_start
from emm.train.trainer import Trainer
from tests.unit.test_akf import Pool
from tests.unit.test_cross_residual import scarce_rows

REPO = Path(__file__).resolve().parents[2]


class FixedRanking(nn.Module):
    """Logits = a fixed score per task (the first dense columns) + a trainable bias: training moves the bias, never the
    ranking, so every epoch's validation AUC is exactly the start's (a fused model whose fusion cannot win)."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.tasks = tasks
        self.bias = nn.Parameter(torch.zeros(tasks))

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        return dense[:, :self.tasks] + self.bias


def rows(n: int, seed: int) -> SplitTensors:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, 2, generator=gen)
    labels = ((dense + torch.randn(n, 2, generator=gen)) > 0).float()
    return SplitTensors(torch.zeros(n, 1, dtype=torch.long), dense, labels, ["a", "b"])


def fit(start_patience: int | None, *, max_epochs: int = 10, patience: int = 4, score_start: bool = True):
    cfg = TrainConfig(max_epochs=max_epochs, patience=patience, min_delta=1e-4, batch_size=64, lr=1e-2, device="cpu")
    trainer = Trainer(FixedRanking(2), cfg, progress=False, score_start=score_start, start_patience=start_patience)
    return trainer.fit(rows(256, 1), rows(200, 2))


# ---- the rule on histories ----------------------------------------------------------------------------------------
def test_any_task_beating_its_own_start_by_more_than_min_delta_counts():
    start = {"epoch": 0, "val_auc": 0.80, "val_auc_a": 0.70, "val_auc_b": 0.90}
    flat = {"epoch": 1, "val_auc": 0.80005, "val_auc_a": 0.70005, "val_auc_b": 0.90005}
    one_task = {"epoch": 1, "val_auc": 0.80010, "val_auc_a": 0.70030, "val_auc_b": 0.89990}  # mean +1e-4, a +3e-4
    assert not beats_start([start, flat], 1e-4)
    assert beats_start([start, one_task], 1e-4)  # the scarce task's gain, not diluted by the mean
    assert not beats_start([start, {**one_task, "val_auc_a": math.nan}], 1e-4)  # NaN is no gain
    assert not beats_start([{**start, "val_auc_a": math.nan}, {**one_task, "val_auc_b": 0.9}], 1e-4)
    assert beats_start([flat], 1e-4)  # no scored start: nothing to beat, the rule never acts


def test_the_reason_after_an_epoch():
    rule = EarlyStop(patience=3, min_delta=1e-4, start_patience=2)
    start = {"epoch": 0, "val_auc_a": 0.7}
    state = {"epoch": 1, "bad_epochs": 1, "history": [start, {"epoch": 1, "val_auc_a": 0.7}]}
    assert rule.reason(state) is None  # one epoch of the two it waits
    state = {"epoch": 2, "bad_epochs": 2, "history": [*state["history"], {"epoch": 2, "val_auc_a": 0.7001}]}
    assert rule.reason(state) == START
    assert EarlyStop(patience=3, min_delta=1e-4).reason(state) is None  # without start_patience: patience alone
    assert rule.reason({**state, "bad_epochs": 3}) == PATIENCE
    assert "step-0" in rule.describe(START) and "0.0001" in rule.describe(START)


# ---- the Trainer --------------------------------------------------------------------------------------------------
def test_a_fit_whose_start_is_not_beaten_gives_up_after_start_patience_epochs():
    result = fit(start_patience=2)
    assert result.stopped == START and result.stopped_early
    assert result.epochs_run == 2 and result.best_epoch == 0 and [r["epoch"] for r in result.history] == [0, 1, 2]
    plain = fit(start_patience=None)  # the same fit with patience alone runs its patience out
    assert plain.stopped == PATIENCE and plain.epochs_run == 4 and plain.best_epoch == 0


def test_the_start_rule_needs_a_scored_start_and_max_epochs_is_a_reason_too():
    unscored = fit(start_patience=1, score_start=False)  # epoch 1 is the first candidate, then patience
    assert unscored.stopped == PATIENCE and unscored.best_epoch == 1 and unscored.epochs_run == 5
    capped = fit(start_patience=None, max_epochs=2)
    assert capped.stopped == MAX_EPOCHS and not capped.stopped_early and capped.epochs_run == 2


# ---- the fuse procedure -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"])


@pytest.mark.parametrize("start_patience, stopped, epochs", [(1, START, 1), (None, PATIENCE, 2)])
def test_the_fuse_plan_hands_start_patience_to_its_phases(pool2, start_patience, stopped, epochs):
    """A learning rate too small to move any score: fusion cannot win, so with start_patience the runner stops after
    one epoch and keeps the donors' blend (epoch 0); the fit records why."""
    cfg = TrainConfig(max_epochs=4, patience=2, min_delta=1e-4, batch_size=128, lr=1e-12, device="cpu", seed=3)
    plan = FusePlan.from_options(FuseOptions(output="donor_residual", tower=[4], train=cfg,
                                             start_patience=start_patience))
    assert plan.start_patience == start_patience
    runner = FuseRunner(plan, pool2.plan, pool2.model_tasks, pool2.schema, progress=False)
    val = scarce_rows(pool2, n=400, seed=21)
    runner.prepare(lambda: val)
    fitted = runner.train(scarce_rows(pool2, n=600, seed=31), val)
    assert fitted.fit.stopped == stopped and fitted.fit.epochs_run == epochs and fitted.fit.best_epoch == 0


# ---- what the rule must not change --------------------------------------------------------------------------------
def test_pretrain_and_baseline_training_settings_are_unchanged():
    """The train settings every model shares keep their fields and defaults: a pool member's signature hashes them
    (a new field would retrain every pool), and pretrain and the benchmark's baselines (``pretrain.train``) train
    with them. The start rule is the fuse procedure's (``fuse.start_patience``), off in a Trainer by default."""
    assert TrainConfig().model_dump() == {"lr": 1e-3, "weight_decay": 1e-6, "batch_size": 1024,
                                          "eval_batch_size": 65536, "max_epochs": 30, "patience": 3,
                                          "min_delta": 1e-5, "seed": 2026, "device": "auto"}
    pretrain = load_params(REPO / "params.yaml").pretrain.train
    assert (pretrain.patience, pretrain.min_delta) == (3, 1e-5)
    cpu = TrainConfig(device="cpu")
    assert Trainer(FixedRanking(2), cpu, progress=False).stop == EarlyStop(3, 1e-5, None)
    unscored = Trainer(FixedRanking(2), cpu, progress=False, start_patience=1)  # no scored start: no start rule
    assert unscored.stop.start_patience is None
    assert FuseOptions().start_patience is None and FusePlan.from_options(FuseOptions()).start_patience is None
