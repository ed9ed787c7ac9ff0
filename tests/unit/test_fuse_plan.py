"""The fuse procedure: the plan built from the fuse options (phases, target, prepare), the benchmark job's
off-setting signature, and the runner executing a plan exactly as the procedure was written by hand."""

from __future__ import annotations

import pytest
import torch

from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.fusion.blend import fit_blend
from emm.fusion.options import FuseOptions
from emm.fusion.procedure import Distill, FineTune, Frozen, FusePlan, FuseRunner, Labels
from emm.pipeline.params import FuseConfig
from emm.tracker import NullTracker
from emm.train.distill import Distillation
from emm.train.options import TrainConfig
from emm.train.trainer import Trainer
from harness.experiments.runner import fuse_job_config
from tests.unit.test_akf import Pool, batch

TRAIN = TrainConfig(max_epochs=2, batch_size=64, lr=1e-2, device="cpu", patience=2, seed=7)


@pytest.fixture(scope="module")
def pool2() -> Pool:
    torch.set_num_threads(1)
    return Pool(["a", "b"])


def rows(n: int, seed: int) -> SplitTensors:
    sparse, dense = batch(n, seed=seed)
    labels = (torch.rand(n, 2, generator=torch.Generator().manual_seed(seed + 1)) < 0.4).float()
    return SplitTensors(sparse, dense, labels, ["a", "b"])


# ---- the plan ---------------------------------------------------------------------------------------------------
def test_the_default_options_plan_one_frozen_phase_on_the_labels():
    plan = FusePlan.from_options(FuseOptions())
    assert plan.phases == (Frozen(score_start=False),) and plan.target == Labels()
    assert plan.prepare is False  # the paper's tower head has nothing to fit on held-out rows
    assert plan.architecture == FuseOptions().akf and plan.train == TrainConfig()


@pytest.mark.parametrize("blend_init, prepare", [("stack", True), ("mean", False)])
def test_a_donor_residual_head_scores_its_start_and_is_prepared_when_stacked(blend_init, prepare):
    plan = FusePlan.from_options(FuseOptions(output="donor_residual", blend_init=blend_init))
    assert plan.phases == (Frozen(score_start=True),) and plan.prepare is prepare


def test_finetune_and_distill_become_a_second_phase_and_a_target():
    plan = FusePlan.from_options(FuseConfig(output="donor_residual", finetune_lr_scale=0.1, distill=0.3))
    assert plan.phases == (Frozen(score_start=True), FineTune(0.1)) and plan.target == Distill(0.3)
    frozen, finetune = plan.phases
    assert (frozen.lr_scale, finetune.lr_scale) == (1.0, 0.1)
    assert finetune.score_start  # always: it may hand back the first phase's best
    assert (frozen.checkpoint, finetune.checkpoint) == ("checkpoint", "checkpoint-finetune")
    assert (frozen.name, finetune.name) == ("frozen", "finetune")


def test_targets_build_a_teacher_only_when_they_need_one():
    def teacher() -> torch.nn.Module:
        raise AssertionError("Labels must not build the teacher")

    assert Labels().distillation(teacher) is None
    distill = Distill(0.25).distillation(lambda: torch.nn.Linear(1, 1))
    assert isinstance(distill, Distillation) and distill.weight == 0.25


@pytest.mark.parametrize("make", [lambda: Distill(0.0), lambda: Distill(1.0), lambda: FineTune(0.0),
                                  lambda: FineTune(1.5),
                                  lambda: FusePlan(FuseOptions().akf, TrainConfig(), phases=())])
def test_impossible_phases_and_targets_are_refused(make):
    with pytest.raises(EMMError):
        make()


def test_the_benchmark_job_leaves_distill_out_while_off_and_builds_the_same_plan():
    """A stored fused job's config never had ``distill``: left out while off, the job's signature is unchanged,
    and the config it keeps rebuilds the very plan the full settings give."""
    off = FuseConfig(output="donor_residual")
    job = fuse_job_config(off)
    assert set(job) == set(FuseConfig.model_fields) - {"distill"}
    assert job["finetune_lr_scale"] is None  # an older setting: stored jobs carry it, off or not
    assert FusePlan.from_options(FuseConfig.model_validate(job)) == FusePlan.from_options(off)
    on = off.model_copy(update={"distill": 0.3})
    assert fuse_job_config(on)["distill"] == 0.3
    assert FusePlan.from_options(FuseConfig.model_validate(fuse_job_config(on))).target == Distill(0.3)


# ---- the runner -------------------------------------------------------------------------------------------------
def test_the_runner_is_the_procedure_callers_used_to_write_by_hand(pool2):
    """Seed, build, stack the blend on held-out rows, one Trainer with the start scored: the same weights."""
    train, val = rows(512, 1), rows(256, 3)
    torch.manual_seed(TRAIN.seed)
    by_hand = pool2.fused(seed=TRAIN.seed, output="donor_residual", tower=[4])
    fit_blend(by_hand, val.sparse, val.dense, val.labels)
    expected = Trainer(by_hand, TRAIN, progress=False, score_start=True).fit(train, val)

    plan = FusePlan.from_options(FuseOptions(output="donor_residual", tower=[4], train=TRAIN))
    runner = FuseRunner(plan, pool2.plan, pool2.model_tasks, pool2.schema, progress=False)
    blend = runner.prepare(lambda: val)
    fitted = runner.train(train, val)
    assert set(blend) == {"a", "b"} and fitted.phases == {} and fitted.record("finetune") is None
    assert fitted.fit.history == expected.history and fitted.fit.best_epoch == expected.best_epoch
    got, want = runner.model.state_dict(), by_hand.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert runner.evaluate(val) == Trainer(by_hand, TRAIN, progress=False).evaluate(val)


def test_a_plan_that_does_not_prepare_never_asks_for_rows(pool2):
    plan = FusePlan.from_options(FuseOptions(output="donor_residual", blend_init="mean", tower=[4], train=TRAIN))
    runner = FuseRunner(plan, pool2.plan, pool2.model_tasks, pool2.schema, progress=False)
    assert runner.prepare(lambda: pytest.fail("rows loaded for nothing")) is None
    with pytest.raises(EMMError, match="evaluate after train"):
        runner.evaluate(rows(8, 0))


class Steps(NullTracker):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def log_metrics(self, metrics, step=None) -> None:
        if step is not None:
            self.steps.append(step)


def test_phases_run_in_order_as_one_fit_each_in_its_own_checkpoint(pool2, tmp_path):
    plan = FusePlan.from_options(FuseOptions(output="donor_residual", tower=[4], train=TRAIN, finetune_lr_scale=0.5))
    tracker = Steps()
    runner = FuseRunner(plan, pool2.plan, pool2.model_tasks, pool2.schema, work_dir=tmp_path, tracker=tracker,
                        made_from={"what": "test"}, progress=False)
    runner.prepare(lambda: rows(256, 3))
    fitted = runner.train(rows(512, 1), rows(256, 3))
    fit, record = fitted.fit, fitted.record("finetune")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint-finetune"]
    assert tracker.steps == list(range(1, fit.epochs_run + 1))  # the fine-tune logs on after the first phase
    assert [r["epoch"] for r in fit.history] == list(range(0, fit.epochs_run + 1))
    assert [r.get("phase") for r in fit.history] == [None] * 3 + ["finetune"] * (fit.epochs_run - 2)
    assert record["lr"] == pytest.approx(TRAIN.lr * 0.5) and record["thawed_params"] > 0
    assert record["first_phase_epochs"] == 2 and record["best_val_auc"] >= record["first_phase_best_val_auc"]
    assert runner.trainer.made_from["phase"] == "finetune" and runner.trainer.made_from["what"] == "test"
    assert all(p.requires_grad for p in runner.model.donors.parameters())
