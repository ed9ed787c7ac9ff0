"""Parquet splits larger than memory, and each rank's share of a split.

Why this module exists: ``emm.data.tensors.load_split`` holds a whole split as tensors, which is the
fastest way to train (batches are index slices) but costs ~(8*n_sparse + 4*n_dense + 4*n_tasks) bytes a
row plus conversion copies: 20M AliExpress rows would need well over 10 GB. Here a split is read row
group by row group instead, and only a bounded shuffle buffer is ever held.

Two things share one idea, the *shard*: rank ``r`` of ``W`` owns the contiguous rows
``[r*N//W, (r+1)*N//W)`` of a split (sizes differ by at most one row), and reads only the row groups that
overlap them, never the whole file.

- ``load_shard``: a rank's rows as in-memory ``SplitTensors`` (DDP on data that fits).
- ``ParquetStream``: a rank's rows as a stream of ``SplitTensors`` batches, the one batch format every
  model takes. Training order per epoch: the row-group pieces in a seeded random order, then rows
  shuffled within a buffer of ``buffer_rows`` (the classic bounded shuffle; what keeps memory flat).
- ``open_split``: picks one of the two for the pipeline stages, from ``params.yaml`` ``scale``.

Missing labels (Parquet nulls) come out as NaN, as in ``load_split``; ``ParquetStream.labelled(task)``
streams only the rows that carry ``task``'s label (a single-task model on scarce labels).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from emm.data.options import ScaleConfig
from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split, offsets
from emm.errors import EMMError


def shard_range(n_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` that rank ``rank`` of ``world`` owns: contiguous, disjoint, covering all rows."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of size {world}")
    return rank * n_rows // world, (rank + 1) * n_rows // world


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` of row group ``group``: the unit a stream reads."""

    group: int
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


def shard_pieces(meta: pq.FileMetaData, start: int, stop: int) -> list[Piece]:
    """The row-group pieces that cover rows ``[start, stop)`` of a file, in file order."""
    pieces, first = [], 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        lo, hi = max(start, first) - first, min(stop, first + n) - first
        if hi > lo:
            pieces.append(Piece(g, lo, hi))
        first += n
    return pieces


def split_path(data_dir: Path, split: str, schema: Schema) -> Path:
    path = Path(data_dir) / f"{split}.parquet"
    if not path.exists():
        raise EMMError(f"{path} does not exist: run `emm ingest {schema.dataset}` (or `emm synth`) first")
    return path


def _columns(schema: Schema, tasks: list[str]) -> list[str]:
    return [f.name for f in schema.sparse] + [f.name for f in schema.dense] + list(tasks)


def _check_columns(path: Path, file_schema: pa.Schema, need: list[str], data_dir: Path) -> None:
    missing = [c for c in need if c not in file_schema.names]
    if missing:
        raise EMMError(f"{path}: columns {missing} missing; it does not match {Path(data_dir) / 'schema.json'}")


def table_to_arrays(table: pa.Table, schema: Schema, tasks: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrow columns -> (sparse int64 with offsets, dense float32, labels float32), without pandas.

    Why not ``frame_to_tensors``: going through pandas copies every column once more; on a stream
    that runs for every row group, the direct route is both faster and lighter.
    """
    n = table.num_rows
    sparse = np.empty((n, schema.n_sparse), np.int64)
    for j, f in enumerate(schema.sparse):
        sparse[:, j] = table.column(f.name).to_numpy()
    sparse += offsets(schema)[None, :]
    dense = np.empty((n, schema.n_dense), np.float32)
    for j, f in enumerate(schema.dense):
        dense[:, j] = table.column(f.name).to_numpy()
    labels = np.empty((n, len(tasks)), np.float32)
    for j, t in enumerate(tasks):  # a null (no label) -> NaN
        labels[:, j] = table.column(t).cast(pa.float32()).to_numpy()
    return sparse, dense, labels


def _tensors(arrays: tuple[np.ndarray, np.ndarray, np.ndarray], tasks: list[str]) -> SplitTensors:
    sparse, dense, labels = arrays
    return SplitTensors(torch.from_numpy(sparse), torch.from_numpy(dense), torch.from_numpy(labels), list(tasks))


def load_shard(data_dir: Path, split: str, schema: Schema, rank: int, world: int,
               tasks: list[str] | None = None) -> SplitTensors:
    """Rank ``rank``'s rows of one split as in-memory tensors, reading only the row groups it overlaps."""
    tasks = list(tasks or schema.task_names)
    path = split_path(data_dir, split, schema)
    pf = pq.ParquetFile(path)
    _check_columns(path, pf.schema_arrow, _columns(schema, tasks), data_dir)
    start, stop = shard_range(pf.metadata.num_rows, rank, world)
    parts = [pf.read_row_group(p.group, columns=_columns(schema, tasks)).slice(p.lo, p.rows)
             for p in shard_pieces(pf.metadata, start, stop)]
    table = pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(_columns(schema, tasks))
    return _tensors(table_to_arrays(table, schema, tasks), tasks)


@dataclass
class ParquetStream:
    """One rank's rows of a Parquet split, as batches.

    Memory: at most ``buffer_rows`` + one row group of decoded rows (plus a row group's Arrow table while
    it is read), whatever the file size.

    ``len()`` is this rank's row count (known from the Parquet footer, nothing is read to get it). With
    ``labelled_only`` (a task name) only the rows carrying that task's label are streamed, and ``len()``
    counts those (from the row groups' null counts where the footer has them, else by reading that one
    column once). The shard is still cut on the file's rows, so ranks may hold different labelled counts:
    ``pad_to`` evens them out as before.
    """

    path: Path
    schema: Schema
    tasks: list[str] = field(default_factory=list)
    rank: int = 0
    world: int = 1
    buffer_rows: int = 262_144
    labelled_only: str | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.tasks = list(self.tasks or self.schema.task_names)
        if self.labelled_only is not None and self.labelled_only not in self.schema.task_names:
            raise EMMError(f"{self.path}: task {self.labelled_only!r} is not in the data "
                           f"(it has {self.schema.task_names})")
        pf = pq.ParquetFile(self.path)
        _check_columns(self.path, pf.schema_arrow, self.columns, self.path.parent)
        self.total_rows = pf.metadata.num_rows
        self.start, self.stop = shard_range(self.total_rows, self.rank, self.world)
        self.pieces = shard_pieces(pf.metadata, self.start, self.stop)
        self.rows = self.stop - self.start
        if self.labelled_only is not None:
            self.rows = sum(self._labelled_in(pf, piece) for piece in self.pieces)

    def _labelled_in(self, pf: pq.ParquetFile, piece: Piece) -> int:
        group = pf.metadata.row_group(piece.group)
        if piece.lo == 0 and piece.hi == group.num_rows:
            col = group.column(pf.schema_arrow.get_field_index(self.labelled_only))
            if col.statistics is not None and col.statistics.has_null_count:
                return piece.rows - col.statistics.null_count
        column = pf.read_row_group(piece.group, columns=[self.labelled_only]).column(0).slice(piece.lo, piece.rows)
        return piece.rows - column.null_count

    @property
    def columns(self) -> list[str]:
        extra = [self.labelled_only] if self.labelled_only and self.labelled_only not in self.tasks else []
        return _columns(self.schema, self.tasks) + extra

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def __len__(self) -> int:
        return self.rows

    def select_tasks(self, names: list[str]) -> "ParquetStream":
        missing = [n for n in names if n not in self.schema.task_names]
        if missing:
            raise EMMError(f"{self.path}: task(s) {missing} are not in the data (it has {self.schema.task_names})")
        return replace(self, tasks=list(names))

    def labelled(self, task: str) -> "ParquetStream":
        """The same stream restricted to the rows that carry ``task``'s label (every task column kept)."""
        return replace(self, labelled_only=task)

    def _read(self, pf: pq.ParquetFile, piece: Piece) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = pf.read_row_group(piece.group, columns=self.columns).slice(piece.lo, piece.rows)
        if self.labelled_only is not None:
            table = table.filter(pc.is_valid(table.column(self.labelled_only)))
        return table_to_arrays(table, self.schema, self.tasks)

    def head(self, n: int) -> SplitTensors:
        """The first ``n`` rows of this rank's shard (a probe batch: shapes, output width)."""
        pf = pq.ParquetFile(self.path)
        out, left = [], n
        for piece in self.pieces:
            if left <= 0:
                break
            if self.labelled_only is None:  # read no more of the group than needed
                piece = Piece(piece.group, piece.lo, min(piece.hi, piece.lo + left))
            arrays = tuple(a[:left] for a in self._read(pf, piece))
            out.append(arrays)
            left -= len(arrays[0])
        if not out:
            return _tensors(table_to_arrays(pf.schema_arrow.empty_table().select(self.columns), self.schema,
                                            self.tasks), self.tasks)
        return _tensors(tuple(np.concatenate(a) for a in zip(*out)), self.tasks)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                pad_to: int | None = None) -> Iterator[SplitTensors]:
        """Batches of ``batch_size`` rows (the last one shorter).

        shuffle: pieces in a random order seeded by (seed, epoch, rank), rows shuffled within the buffer.
        pad_to: yield exactly this many rows by repeating a few already-seen ones at the end, so that all
        DDP ranks take the same number of steps (shards differ by at most one row).
        """
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        pad = max(0, (pad_to or 0) - len(self))
        if not shuffle:
            yield from self._ordered(batch_size, pad)
            return
        rng = np.random.default_rng([seed, epoch, self.rank])
        order = rng.permutation(len(self.pieces))
        pf = pq.ParquetFile(self.path)
        pool: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        pooled = 0
        spare: tuple[np.ndarray, ...] | None = None  # a few seen rows, for pad_to
        for k, i in enumerate(order):
            pool.append(self._read(pf, self.pieces[i]))
            pooled += len(pool[-1][0])
            if pooled < self.buffer_rows and k < len(order) - 1:
                continue
            # one copy of the buffer, batches gathered from it through a permutation (no second copy)
            merged = tuple(np.concatenate(a) for a in zip(*pool)) if len(pool) > 1 else pool[0]
            pool = []
            perm = rng.permutation(len(merged[0]))
            full = len(perm) // batch_size * batch_size
            for s in range(0, full, batch_size):
                idx = perm[s:s + batch_size]
                yield _tensors(tuple(a[idx] for a in merged), self.tasks)
            if spare is None and pad and len(perm):
                spare = _repeat_to(tuple(a[perm[:pad]] for a in merged), pad)
            rest = tuple(a[perm[full:]] for a in merged)  # fewer than a batch: carried into the next buffer
            del merged
            pool, pooled = [rest], len(rest[0])
        if not pool:
            return
        tail = pool[0]
        if spare is not None:
            tail = tuple(np.concatenate([t, a]) for t, a in zip(tail, spare))
        for s in range(0, len(tail[0]), batch_size):
            yield _tensors(tuple(a[s:s + batch_size] for a in tail), self.tasks)

    def _ordered(self, batch_size: int, pad: int) -> Iterator[SplitTensors]:
        pf = pq.ParquetFile(self.path)
        for piece in self.pieces:
            arrays = self._read(pf, piece)
            for s in range(0, len(arrays[0]), batch_size):
                yield _tensors(tuple(a[s:s + batch_size] for a in arrays), self.tasks)
        if pad and self.pieces:
            probe = self.head(pad)
            if len(probe):
                yield _tensors(_repeat_to((probe.sparse.numpy(), probe.dense.numpy(), probe.labels.numpy()), pad),
                               self.tasks)


def _repeat_to(arrays: tuple[np.ndarray, ...], n: int) -> tuple[np.ndarray, ...]:
    """Exactly ``n`` rows, cycling through the given ones (a labelled-only shard may hold fewer than a pad)."""
    have = len(arrays[0])
    if have == n or have == 0:
        return arrays
    idx = np.arange(n) % have
    return tuple(a[idx] for a in arrays)


def should_stream(schema: Schema, scale: ScaleConfig | None) -> bool:
    """Stream when asked to, or (auto) when the train split is too large to hold comfortably."""
    if scale is None or scale.stream == "never":
        return False
    return scale.stream == "always" or schema.rows.get("train", 0) > scale.stream_above_rows


def open_split(data_dir: Path, split: str, schema: Schema, scale: ScaleConfig | None = None, *,
               rank: int = 0, world: int = 1) -> SplitTensors | ParquetStream:
    """This rank's rows of a split, streamed or in memory (``scale.stream``).

    A single process that does not stream gets exactly ``load_split`` (the original fast path).
    """
    if should_stream(schema, scale):
        return ParquetStream(split_path(data_dir, split, schema), schema, rank=rank, world=world,
                             buffer_rows=scale.buffer_rows)
    if world == 1:
        return load_split(data_dir, split, schema)
    return load_shard(data_dir, split, schema, rank, world)
