"""Ingested Parquet splits -> the one batch format every model takes.

A split is three tensors: ``sparse: LongTensor[N, n_sparse]`` (indices already offset into one shared
embedding table; index 0 of each feature's block means 'unseen'), ``dense: FloatTensor[N, n_dense]`` and
``labels: FloatTensor[N, n_tasks]`` (NaN where a row has no label for a task: a Parquet null, see
``emm.data.labels``). Why whole tensors: batches are then index slices (no per-row
Python, no dict per sample), which is what makes training fast on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from emm.data.schema import Schema
from emm.errors import EMMError


@dataclass
class SplitTensors:
    sparse: torch.Tensor
    dense: torch.Tensor
    labels: torch.Tensor
    task_names: list[str]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> "SplitTensors":
        return SplitTensors(self.sparse.to(device), self.dense.to(device), self.labels.to(device), self.task_names)

    def head(self, n: int) -> "SplitTensors":
        return SplitTensors(self.sparse[:n], self.dense[:n], self.labels[:n], self.task_names)

    def select_tasks(self, names: list[str]) -> "SplitTensors":
        idx = [self.task_names.index(n) for n in names]
        return SplitTensors(self.sparse, self.dense, self.labels[:, idx], list(names))

    def labelled(self, task: str) -> "SplitTensors":
        """The rows that carry ``task``'s label (every task column kept; other tasks may still be NaN there).

        Why: a single-task model, a booster or a donor stack for ``task`` trains and early-stops on exactly
        these rows; a row without the label carries nothing for it.
        """
        if task not in self.task_names:
            raise EMMError(f"task {task!r} is not in these tensors (they hold {self.task_names})")
        keep = ~self.labels[:, self.task_names.index(task)].isnan()
        if bool(keep.all()):
            return self
        return SplitTensors(self.sparse[keep], self.dense[keep], self.labels[keep], self.task_names)


def offsets(schema: Schema) -> np.ndarray:
    return np.array([f.offset for f in schema.sparse], dtype=np.int64)


def load_split(data_dir: Path, split: str, schema: Schema | None = None) -> SplitTensors:
    """Load one ingested split as tensors (sparse offsets applied)."""
    data_dir = Path(data_dir)
    schema = schema or Schema.load(data_dir)
    path = data_dir / f"{split}.parquet"
    if not path.exists():
        raise EMMError(f"{path} does not exist: run `emm ingest {schema.dataset}` first")
    table = pq.read_table(path)
    need = [f.name for f in schema.sparse] + [f.name for f in schema.dense] + schema.task_names
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise EMMError(f"{path}: columns {missing} missing; it does not match {data_dir / 'schema.json'}")
    return frame_to_tensors(table.to_pandas(), schema)


def frame_to_tensors(frame, schema: Schema, with_labels: bool = True) -> SplitTensors:
    """Encoded DataFrame (local indices, scaled dense, 0/1 labels) -> tensors with offsets applied.

    A missing label (a null in Parquet: NaN in a float column, <NA> in a nullable Int8 one) becomes NaN.
    """
    n = len(frame)
    sparse_cols = [f.name for f in schema.sparse]
    sparse = (frame[sparse_cols].to_numpy(dtype=np.int64) if sparse_cols else np.zeros((n, 0), np.int64))
    sparse = sparse + offsets(schema)[None, :]
    dense_cols = [f.name for f in schema.dense]
    dense = frame[dense_cols].to_numpy(dtype=np.float32) if dense_cols else np.zeros((n, 0), np.float32)
    if with_labels:
        labels = frame[schema.task_names].to_numpy(dtype=np.float32, na_value=np.nan)
    else:
        labels = np.zeros((n, len(schema.task_names)), np.float32)
    # writable, contiguous copies only where needed: a column read zero-copy from Arrow is read-only
    sparse, dense, labels = (np.require(a, requirements=["C", "W"]) for a in (sparse, dense, labels))
    return SplitTensors(torch.from_numpy(sparse), torch.from_numpy(dense), torch.from_numpy(labels),
                        schema.task_names)
