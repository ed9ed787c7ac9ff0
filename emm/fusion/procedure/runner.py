"""The fuse procedure executed: a ``FusePlan`` run with the Trainer, the one way any caller fuses.

``FuseRunner(plan, decomposition, model_tasks, schema, ...)`` builds the plan's architecture (seeded by the plan's
train seed), ``prepare`` fits the output head on held-out rows when the plan says so, and ``train`` runs the plan's
phases in order, each a ``Trainer.fit`` that starts from the weights the previous phase kept, with the plan's
target. The fuse stage, the benchmark's fused jobs (through the stage) and the probes in ``harness/benchmarks/``
call it; what differs between them is only what they hand it: the rows, a work dir for checkpoints, a tracker.

Why the phases are chained into one fit: ``fused.json``, the tracker and early stopping see one training run whose
epochs are numbered on across phases (a later phase logs its epochs after the earlier ones': steps 1..N), and a
phase after the first records what it did (its lr, the parameters it thawed, whether it kept its own best or the
previous phase's).

Stopping: each phase is early-stopped by the Trainer, and a phase that scores its start gives up after the plan's
``start_patience`` epochs when no task beat that start (``emm.train.stopping``); the chained fit's ``stopped`` says
why the last phase ended.

Resume: phase k checkpoints under ``work_dir / phase.checkpoint``; a phase after the first is made from what the
previous phase was made from plus its own name, so each resumes only its own unfinished work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emm.data.schema import Schema
from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.fusion.blend import DonorEnsemble, OutputMember
from emm.fusion.decompose import Plan
from emm.fusion.fused import FusedModel, build_fused
from emm.fusion.procedure.plan import FusePlan, Phase
from emm.tracker import Tracker
from emm.train.trainer import Data, FitResult, Trainer

log = logging.getLogger(__name__)


@dataclass
class FuseFit:
    """The plan's phases as one fit, and the record of every phase after the first, by phase name."""

    fit: FitResult
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_start: list[str] = field(default_factory=list)  # tasks put back to their step-0 output (``keep_start``)

    def record(self, phase: str) -> dict[str, Any] | None:
        """The named phase's record for ``fused.json`` (None: the plan had no such phase, or it ran first)."""
        return self.phases.get(phase)


class FuseRunner:
    """Executes a ``FusePlan``: builds its model, prepares its output head, trains its phases.

    Args:
        plan: what to build and how to train it (``FusePlan.from_options``).
        decomposition: the pool's decomposition (``emm.fusion.decompose``), which the model and a
            distillation teacher are built on.
        model_tasks: the task of each pool model, in plan order.
        schema: the data's schema (the fused model's tasks, its fresh embedding's sizes, the checkpoint record).
        work_dir: where the phases checkpoint (None: no checkpoints, no resume).
        made_from: what the checkpoints are made from besides the train settings and the schema (the Trainer's
            ``made_from``: upstream digests, the architecture).
        tracker, progress, desc: the Trainer's.
        outputs: the pool members that join at the output (tree models, ``emm.fusion.blend.OutputMember``): donors
            of the model's blend and of a distillation teacher, never trained.
    """

    def __init__(self, plan: FusePlan, decomposition: Plan, model_tasks: Sequence[str], schema: Schema, *,
                 work_dir: Path | None = None, made_from: Mapping[str, Any] | None = None,
                 tracker: Tracker | None = None, progress: bool = True, desc: str = "fused",
                 outputs: Sequence[OutputMember] = ()) -> None:
        self.plan = plan
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.made_from = made_from
        self.tracker = tracker
        self.progress = progress
        self.desc = desc
        self.fingerprint = schema.fingerprint()
        self._teacher = lambda: DonorEnsemble(decomposition, model_tasks, schema.task_names, outputs)
        torch.manual_seed(plan.train.seed)
        self.model: FusedModel = build_fused(decomposition, model_tasks, schema.task_names, plan.architecture, schema,
                                             outputs)
        self.trainer: Trainer | None = None  # the last phase's, once trained: it scores the final model

    def prepare(self, rows: Callable[[], SplitTensors]) -> dict[str, dict[str, float]] | None:
        """Fit the output head on held-out rows (the donor stack) when the plan prepares; ``rows`` is called only
        then. A row may lack a task's label (NaN): each task is fitted on its labelled rows only (training, by
        contrast, uses every row, each task's loss masked to its labels: the rich task's rows carry the signal).
        Deterministic: every DDP rank given the same rows fits the same head. Returns the record for ``fused.json``
        (None: nothing fitted)."""
        if not self.plan.prepare:
            return None
        held_out = rows()
        fitted = self.model.prepare(held_out.sparse, held_out.dense, held_out.labels)
        log.info("donor blend (stack on %d held-out rows): %s", len(held_out), fitted)
        return fitted

    def train(self, train: Data, val: Data, *, resume: bool = False) -> FuseFit:
        """Every phase of the plan in order, early-stopped on ``val``; the model ends with the best weights kept."""
        distill = self.plan.target.distillation(self._teacher)
        start = self.model.start_state() if self.plan.keep_start_per_task else None
        fit: FitResult | None = None
        trainer: Trainer | None = None
        records: dict[str, dict[str, Any]] = {}
        for phase in self.plan.phases:
            thawed = phase.start(self.model)
            cfg = self.plan.train.model_copy(update={"lr": self.plan.train.lr * phase.lr_scale})
            made_from = self.made_from if trainer is None else {**trainer.made_from, "phase": phase.name}
            trainer = Trainer(self.model, cfg, checkpoint_dir=self._checkpoint(phase), fingerprint=self.fingerprint,
                              made_from=made_from, tracker=self.tracker, progress=self.progress,
                              desc=f"{self.desc} {phase.label}".rstrip(), score_start=phase.score_start,
                              distill=distill, first_step=fit.epochs_run if fit is not None else 0,
                              start_patience=self.plan.start_patience)
            this = trainer.fit(train, val, resume=resume)
            if fit is None:
                fit = this
                continue
            records[phase.name] = phase_record(phase, fit, this, cfg.lr, thawed)
            fit = chain(fit, this, phase)
        assert fit is not None  # FusePlan refuses an empty phase list
        self.trainer = trainer
        kept = keep_start(self.model, fit, start) if start is not None else []
        return FuseFit(fit, records, kept)

    def evaluate(self, data: Data) -> dict[str, dict[str, float]]:
        """Per-task AUC/logloss of the trained model on a split (the Trainer's ``evaluate``)."""
        if self.trainer is None:
            raise EMMError(f"{self.desc}: evaluate after train")
        return self.trainer.evaluate(data)

    def _checkpoint(self, phase: Phase) -> Path | None:
        return self.work_dir / phase.checkpoint if self.work_dir is not None else None


def tasks_better_at_start(fit: FitResult, tasks: Sequence[str]) -> list[str]:
    """The tasks whose validation AUC at step 0 (history epoch 0) is at least their AUC at the kept epoch.

    Why per task: early stopping keeps the epoch with the best *mean* validation AUC, so a task whose residual
    only fitted noise (a task with scarce labels: a few hundred labelled rows, its donors in-sample on the rest)
    can be made worse by an epoch the other tasks gained from. For such a task the step-0 model, its donors'
    blend, is the better of the two candidates on the same validation rows. A task whose AUC is NaN at either
    (no two classes among its labelled rows) is left as trained."""
    rows = {row["epoch"]: row for row in fit.history}
    if fit.best_epoch == 0 or 0 not in rows or fit.best_epoch not in rows:
        return []
    at_start, kept = rows[0], rows[fit.best_epoch]
    return [t for t in tasks if at_start.get(f"val_auc_{t}", math.nan) >= kept.get(f"val_auc_{t}", math.nan)]


def keep_start(model: FusedModel, fit: FitResult, state: dict[str, torch.Tensor]) -> list[str]:
    """Put back to step 0 every task ``tasks_better_at_start`` names; returns them (for ``fused.json``)."""
    tasks = tasks_better_at_start(fit, model.task_names)
    for task in tasks:
        model.restore_start(task, state)
    if tasks:
        log.info("task(s) %s: validation AUC no better at epoch %d than at step 0, so they keep their donors' "
                 "blend (residual off)", tasks, fit.best_epoch)
    return tasks


def phase_record(phase: Phase, before: FitResult, after: FitResult, lr: float,
                 thawed: list[torch.nn.Parameter]) -> dict[str, Any]:
    """What a phase after the first did, for ``fused.json``: its lr, the parameters it thawed, why the phase before
    it stopped (the chained fit keeps only the last phase's reason), the validation AUC it started from and ended
    at, and which weights were kept (its own best, or the earlier phases')."""
    record = {"lr": lr, "thawed_params": sum(p.numel() for p in thawed), "first_phase_epochs": before.epochs_run,
              "first_phase_stopped": before.stopped,
              "first_phase_best_val_auc": before.best_val_auc, "best_val_auc": after.best_val_auc,
              "kept": phase.name if after.best_epoch > 0 else "first phase"}
    log.info("%s at lr %.2g: %s (val AUC %.5f -> %.5f)", phase.label, lr, record["kept"], before.best_val_auc,
             after.best_val_auc)
    return record


def chain(before: FitResult, after: FitResult, phase: Phase) -> FitResult:
    """Two consecutive fits as one: ``after``'s epochs numbered on from ``before``'s and tagged with its phase (its
    epoch 0, a re-score of the weights ``before`` kept, is left out of the history)."""
    offset = before.epochs_run
    history = before.history + [{**row, "epoch": row["epoch"] + offset, "phase": phase.name}
                                for row in after.history if row["epoch"] > 0]
    best_epoch = before.best_epoch if after.best_epoch == 0 else offset + after.best_epoch
    return FitResult(best_epoch=best_epoch, best_val_auc=after.best_val_auc, epochs_run=offset + after.epochs_run,
                     stopped_early=after.stopped_early, seconds=before.seconds + after.seconds, history=history,
                     stopped=after.stopped)
