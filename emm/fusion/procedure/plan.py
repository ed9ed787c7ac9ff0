"""The fuse procedure as data: which model is built, trained in which phases, towards which target.

Why a plan apart from its runner: the switches that change the procedure (``blend_init``, ``finetune_lr_scale``,
``distill``) are read once, in ``FusePlan.from_options``, into phases and a target; the runner
(``emm.fusion.procedure.runner``) only iterates what the plan holds. The fuse stage, the benchmark's fused jobs
and the probes in ``harness/benchmarks/`` all execute a plan that way, so none of them can drift from the others by
rebuilding the procedure by hand (a probe that did ignored distillation and the fine-tune phase).

Why each phase and target is a small class: what differs between them (what a phase thaws, its learning-rate
scale, where it checkpoints; whether the training targets are the labels or a teacher's soft targets) is
behaviour on the class, so adding a phase or a target is one class here, not a branch in every caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from emm.errors import EMMError
from emm.fusion.options import AKFOptions, FuseOptions
from emm.fusion.recipes import OUTPUTS
from emm.train.distill import Distillation
from emm.train.options import TrainConfig


class Phase:
    """One training phase: the Trainer run once (early-stopped), starting from the weights the previous phase kept.

    ``name`` keys the phase's record in ``fused.json`` and its history rows; ``label`` names it in logs and the
    progress bar; ``checkpoint`` is its folder under the work dir (resume continues a phase there).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    checkpoint: ClassVar[str] = "checkpoint"
    lr_scale: float = 1.0      # the phase trains at the plan's lr x this
    score_start: bool = False  # the phase's starting weights are a candidate early stopping may return (epoch 0)

    def start(self, model: nn.Module) -> list[nn.Parameter]:
        """Change the model as the phase needs before it trains; returns the parameters it thawed."""
        return []


@dataclass(frozen=True)
class Frozen(Phase):
    """The pool's components (and donors) frozen: only what fuses them trains (the paper's procedure).

    ``score_start``: the output head starts as a model worth keeping (``OutputHead.scores_at_start``).
    """

    score_start: bool = False
    name: ClassVar[str] = "frozen"


@dataclass(frozen=True)
class FineTune(Phase):
    """Linear-probe-then-fine-tune's second phase: every pool parameter thawed, all trained at lr x ``lr_scale``.

    It always scores its start (the previous phase's best weights), so early stopping can only hand back a model
    at least as good on validation as the previous phase's. Why the thawed modules stay in eval mode:
    ``FusedModel.unfreeze_pool``.
    """

    lr_scale: float
    name: ClassVar[str] = "finetune"
    label: ClassVar[str] = "fine-tune"
    checkpoint: ClassVar[str] = "checkpoint-finetune"
    score_start: ClassVar[bool] = True  # a fixed fact of the phase, not a setting

    def __post_init__(self) -> None:
        if not 0.0 < self.lr_scale <= 1.0:
            raise EMMError(f"fine-tune lr scale {self.lr_scale} is outside (0, 1]: the phase trains at lr x it")

    def start(self, model: nn.Module) -> list[nn.Parameter]:
        return model.unfreeze_pool()


class Target:
    """What the training batches are scored against (validation and test always score the labels)."""

    def distillation(self, teacher: Callable[[], nn.Module]) -> Distillation | None:
        """The Trainer's ``distill`` argument; ``teacher`` builds the teacher, called only when one is needed."""
        return None


@dataclass(frozen=True)
class Labels(Target):
    """The labels alone (the paper)."""


@dataclass(frozen=True)
class Distill(Target):
    """``(1 - weight) x label + weight x the teacher's probability`` (``emm.train.distill``), 0 < weight < 1."""

    weight: float

    def __post_init__(self) -> None:
        if not 0.0 < self.weight < 1.0:
            raise EMMError(f"distillation weight {self.weight} is outside (0, 1): 0 means the labels alone (Labels), "
                           "1 would ignore the labels altogether")

    def distillation(self, teacher: Callable[[], nn.Module]) -> Distillation:
        return Distillation(teacher(), self.weight)


@dataclass(frozen=True)
class FusePlan:
    """The architecture to build, the ordered training phases, the target, and the train settings they share.

    ``prepare``: fit the output head's held-out part (the donor stack) on held-out rows before training.
    ``keep_start_per_task``: after training, a task whose validation AUC was no better at the kept epoch than at
    step 0 returns to its step-0 output (``FuseRunner``); only for a head whose step 0 is a model (the donors'
    blend) and a single frozen phase (a fine-tune moves the donors, so step 0 could not be restored per task).
    ``start_patience``: every phase that scores its start gives up after that many epochs when no task beat its
    start by ``train.min_delta`` (``emm.train.stopping``); None: ``train.patience`` alone.
    """

    architecture: AKFOptions
    train: TrainConfig
    phases: tuple[Phase, ...] = field(default_factory=lambda: (Frozen(),))
    target: Target = field(default_factory=Labels)
    prepare: bool = False
    keep_start_per_task: bool = False
    start_patience: int | None = None

    def __post_init__(self) -> None:
        if not self.phases:
            raise EMMError("a fuse plan needs at least one training phase")

    @classmethod
    def from_options(cls, options: FuseOptions) -> FusePlan:
        """The one place the fuse options' training switches are read: ``finetune_lr_scale`` adds a ``FineTune``
        phase after the ``Frozen`` one, ``distill`` > 0 makes the target ``Distill``, and ``blend_init="stack"``
        prepares an output head that has something to prepare."""
        head = OUTPUTS[options.output]
        finetune = () if options.finetune_lr_scale is None else (FineTune(options.finetune_lr_scale),)
        return cls(architecture=options.akf, train=options.train,
                   phases=(Frozen(score_start=head.scores_at_start), *finetune),
                   target=Distill(options.distill) if options.distill > 0 else Labels(),
                   prepare=options.blend_init == "stack" and head.prepares,
                   keep_start_per_task=(options.keep_start_per_task and head.scores_at_start
                                        and options.finetune_lr_scale is None),
                   start_patience=options.start_patience)
