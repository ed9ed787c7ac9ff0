"""When a fit stops, and why: the Trainer's early-stopping rule, apart from the loop that applies it.

Two rules, checked after every epoch on the state the Trainer checkpoints (so a resumed fit decides alike):

- ``patience`` (every fit): ``patience`` epochs in a row without a mean validation AUC above the best so far by
  more than ``min_delta``. Why the mean: the Trainer keeps one set of weights for all tasks, so it ranks epochs
  by one number.
- ``start_patience`` (a fit that scores its start as epoch 0, the fuse stage's donor blend): after that many
  epochs, stop if no epoch has lifted *any* task's validation AUC above its own step-0 value by more than
  ``min_delta``. Why: such a start is already a model worth keeping, and the fuse procedure puts a task back to it
  when training gained it nothing (``keep_start_per_task``); so training can pay only while some task beats its
  own start. Why per task rather than on the mean: a scarce task's gain is divided by the number of tasks in the
  mean, and it is the task fusion is for. When no task moved, later epochs only confirm the start (on Census the
  whole fuse stage went to that), so the fit gives up. Without a scored start the rule never acts.

A fit that runs out of epochs stops for ``max_epochs``. The reason is ``FitResult.stopped`` (one of ``REASONS``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_EPOCHS, PATIENCE, START = "max_epochs", "patience", "start_patience"
REASONS = (MAX_EPOCHS, PATIENCE, START)


@dataclass(frozen=True)
class EarlyStop:
    """The rule (see the module docstring); ``start_patience`` None: the ``patience`` rule alone."""

    patience: int
    min_delta: float
    start_patience: int | None = None

    def improves(self, val_auc: float, best: float) -> bool:
        """Whether a mean validation AUC is a new best (more than ``min_delta`` above ``best``)."""
        return val_auc > best + self.min_delta

    def reason(self, state: Mapping[str, Any]) -> str | None:
        """Why the fit stops after the epoch ``state`` has reached (the Trainer's ``epoch``, ``bad_epochs``,
        ``history``); None: it goes on (``max_epochs`` is the loop's own bound)."""
        if state["bad_epochs"] >= self.patience:
            return PATIENCE
        if (self.start_patience is not None and state["epoch"] >= self.start_patience
                and not beats_start(state["history"], self.min_delta)):
            return START
        return None

    def describe(self, reason: str) -> str:
        """The reason in words, for the log."""
        if reason == START:
            return (f"no task's validation AUC rose above its step-0 value by more than {self.min_delta:g} "
                    f"within {self.start_patience} epoch(s)")
        if reason == PATIENCE:
            return f"no mean validation AUC gain above {self.min_delta:g} in {self.patience} epoch(s)"
        return "max_epochs reached"


def beats_start(history: Sequence[Mapping[str, float]], min_delta: float) -> bool:
    """Whether any epoch after the scored start (history epoch 0) lifted any task's validation AUC above its step-0
    value by more than ``min_delta``; True when there is no scored start (nothing to beat). A NaN AUC (a task with
    one class among its labelled rows) never counts as a gain."""
    start = next((row for row in history if row["epoch"] == 0), None)
    if start is None:
        return True
    tasks = [k for k in start if k.startswith("val_auc_")]
    return any(row[k] > start[k] + min_delta for row in history if row["epoch"] > 0
               for k in tasks if k in row and not math.isnan(start[k]))
