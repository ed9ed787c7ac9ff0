"""Scoring a pool member the one way every member is scored, and what an imported member's result is made from.

Why apart from ``pool_import``: the tree members' import (``pool_trees``) scores and signs the same way, and
``pool_import`` hands MLflow tree models to it, so these live below both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from emm.data.labels import require_labelled, unlabelled_message
from emm.data.options import ScaleConfig
from emm.data.schema import Schema
from emm.data.stream import ParquetStream, open_split
from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.models.external import Member
from emm.train.metrics import task_metrics
from emm.train.predict import predict_proba, predict_stream

CHECK_ROWS = 256  # validation rows the checks and the trace run on (plus a second, smaller batch)


def import_signature(member: Member, fingerprint: str) -> dict[str, Any]:
    """What an imported result was made from: the entry (weights pinned by sha256) and the data schema."""
    return {"member": member.model_dump(mode="json"), "fingerprint": fingerprint}


def task_rows(data: SplitTensors | ParquetStream, task: str, split: str, schema: Schema,
              what: str) -> SplitTensors | ParquetStream:
    """``data``'s rows labelled for ``task``, that task's column alone: what a single-task member trains,
    early-stops and is scored on. Why not all rows: an unlabelled row carries nothing for a one-task model,
    and its NaN label must never reach a loss or an AUC. An error (``require_labelled``) names the task and
    split when none is labelled or they hold one class."""
    data = data.select_tasks([task])
    if isinstance(data, ParquetStream):  # the split is not read here: the schema's counts say what it holds
        problem = unlabelled_message(task, split, what, schema.labelled_rows(task, split),
                                     schema.task(task).positives.get(split, 0))
        if problem:
            raise EMMError(problem)
        return data if schema.labelled_rows(task, split) == schema.rows[split] else data.labelled(task)
    require_labelled(data.labels[:, 0], task, split, what)
    return data.labelled(task)


@torch.no_grad()
def score(model: nn.Module, data_dir: Path, split: str, schema: Schema, task: str,
          scale: ScaleConfig | None, *, what: str = "the model") -> dict[str, float]:
    """AUC and logloss of a member on a whole split's rows labelled for ``task`` (streamed when ``scale``
    says so), as for built-in ones; ``what`` names it when it scores NaN on some row (the checks before only
    ran it on the first rows)."""
    data = task_rows(open_split(data_dir, split, schema, scale), task, split, schema, what)
    if isinstance(data, ParquetStream):
        probs, labels = predict_stream(model, data)
    else:
        probs, labels = predict_proba(model, data), data.labels.numpy()
    return task_metrics(labels, probs, [task], what=what)[task]
