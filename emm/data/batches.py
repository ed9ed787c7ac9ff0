"""Batches for a model you train yourself, and the record of which data encoding it was trained on.

Why this module: a model trained outside EMM joins a pool only if it saw *exactly* the numbers EMM will
feed it: the same vocabulary indices, the same scaled dense values, in one of two layouts. Rather than
describe those numbers and hope, EMM hands them out (``UserBatches`` reads the ingested Parquet) and
lets the user record what they were (``save_encoding`` / ``encoding_record``), so a model trained on
another ingest is refused at import with what differs named, instead of scoring garbage.

The two input conventions (a pool entry's ``inputs:``)
    ``tensors``: ``(sparse, dense)``. ``sparse`` is a LongTensor ``[B, n_sparse]`` of *global* indices
    into one shared table of ``schema.total_vocab`` rows: column ``j`` holds
    ``schema.sparse[j].offset + local_j``, where ``local_j`` is the value's index in feature ``j``'s
    vocabulary, ``1..vocab_size-1`` for values seen at ingest and ``0`` for unseen ones. ``dense`` is a
    FloatTensor ``[B, n_dense]``: ``(x - min) / (max - min)`` clipped to ``[0, 1]``, with the min/max
    recorded in ``schema.json``. Columns are in ``schema.json`` order (EMM's own models take this).
    ``dict``: ``{feature name: tensor [B]}`` (the torch-rechub convention): every sparse feature a
    LongTensor of its *local* index ``0..vocab_size-1`` (0 = unseen; an embedding of ``vocab_size``
    rows fits), every dense feature a FloatTensor of the same scaled value.
Labels are FloatTensor 0/1: ``[B]`` for one task, ``[B, T]`` for several, in the order asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split
from emm.errors import EMMError
from emm.io import write_json

Convention = Literal["tensors", "dict"]
CONVENTIONS: tuple[str, ...] = ("tensors", "dict")
ENCODING_FORMAT = "emm.encoding/1"
ENCODING_SUFFIX = ".encoding.json"


def to_dict(sparse: torch.Tensor, dense: torch.Tensor, schema: Schema) -> dict[str, torch.Tensor]:
    """EMM's ``(sparse, dense)`` -> ``{feature name: tensor [B]}`` with per-feature *local* indices."""
    out: dict[str, torch.Tensor] = {}
    for j, f in enumerate(schema.sparse):
        out[f.name] = sparse[:, j] - f.offset
    for k, f in enumerate(schema.dense):
        out[f.name] = dense[:, k]
    return out


def feature_table(source: Path | Schema) -> dict[str, list]:
    """What a model must be built for: ``{"sparse": [(name, vocab_size), ...], "dense": [name, ...]}``,
    in schema order (``source``: an ingested data folder or its ``Schema``). E.g. torch-rechub:
    ``[SparseFeature(n, v, embed_dim=8) for n, v in t["sparse"]] + [DenseFeature(n) for n in t["dense"]]``."""
    schema = source if isinstance(source, Schema) else Schema.load(Path(source))
    return {"sparse": [(f.name, f.vocab_size) for f in schema.sparse], "dense": [f.name for f in schema.dense]}


class UserBatches:
    """One split of the ingested data as ``(inputs, labels)`` batches in a chosen convention.

    Re-iterable (one pass per ``for``), with ``len()``, so it can stand where a torch ``DataLoader`` does
    (torch-rechub's ``CTRTrainer.fit(train, val)`` takes it as is). ``shuffle`` draws a new order on
    every pass from ``seed`` and the pass number, so two runs with one seed see the same batches.
    """

    def __init__(self, data_dir: Path | str, split: str, *, tasks: str | Sequence[str] | None = None,
                 inputs: Convention = "tensors", batch_size: int = 1024, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False) -> None:
        if inputs not in CONVENTIONS:
            raise EMMError(f"inputs={inputs!r} is not an input convention; use one of {list(CONVENTIONS)}")
        if batch_size < 1:
            raise EMMError(f"batch_size must be at least 1, got {batch_size}")
        self.schema = Schema.load(Path(data_dir))
        self.single = isinstance(tasks, str)
        names = [tasks] if isinstance(tasks, str) else list(tasks or self.schema.task_names)
        unknown = [t for t in names if t not in self.schema.task_names]
        if unknown:
            raise EMMError(f"tasks {unknown} are not tasks of {data_dir} ({self.schema.task_names})")
        self.data: SplitTensors = load_split(Path(data_dir), split, self.schema).select_tasks(names)
        self.inputs, self.batch_size, self.shuffle, self.seed = inputs, batch_size, shuffle, seed
        self.drop_last = drop_last
        self._passes = 0

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self._passes))
        else:
            order = torch.arange(n)
        self._passes += 1
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            sparse, dense, labels = self.data.sparse[idx], self.data.dense[idx], self.data.labels[idx]
            x = (sparse, dense) if self.inputs == "tensors" else to_dict(sparse, dense, self.schema)
            yield x, labels[:, 0] if self.single else labels


# ---- which encoding a model was trained on ---------------------------------------------------------------------
def encoding_record(source: Path | Schema) -> dict[str, Any]:
    """What a model trained on this data depends on, as JSON: the schema fingerprint and the parts of the
    schema it hashes (so a mismatch can be *described*, not just detected)."""
    schema = source if isinstance(source, Schema) else Schema.load(Path(source))
    return {
        "format": ENCODING_FORMAT,
        "dataset": schema.dataset,
        "fingerprint": schema.fingerprint(),
        "sparse": [{"name": f.name, "vocab_size": f.vocab_size, "offset": f.offset, "values_sha256": f.values_sha256,
                    "edges": f.edges} for f in schema.sparse],
        "dense": [{"name": f.name, "min": f.min, "max": f.max} for f in schema.dense],
        "tasks": schema.task_names,
    }


def encoding_path(weights: Path | str) -> Path:
    """The sidecar next to a weights file: ``model.safetensors`` -> ``model.encoding.json``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + ENCODING_SUFFIX)


def save_encoding(weights: Path | str, data_dir: Path | str) -> Path:
    """Record next to ``weights`` which ingested data (``data_dir``) the model was trained on."""
    path = encoding_path(weights)
    write_json(path, encoding_record(Path(data_dir)))
    return path


def read_encoding(path: Path) -> dict[str, Any]:
    """A recorded encoding (sidecar or MLflow artifact); a clear error for a file that is not one."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EMMError(f"{path} is not a readable encoding record ({exc}); write it again with "
                       "emm.data.batches.save_encoding") from exc
    if not isinstance(record, dict) or record.get("format") != ENCODING_FORMAT or "fingerprint" not in record:
        raise EMMError(f"{path} is not an EMM encoding record (format {ENCODING_FORMAT!r}); write it again with "
                       "emm.data.batches.save_encoding")
    return record


def encoding_differences(record: dict[str, Any], schema: Schema, limit: int = 8) -> list[str]:
    """How the encoding a model was trained on differs from ``schema``'s, one line per difference
    (empty when the fingerprints match)."""
    if record.get("fingerprint") == schema.fingerprint():
        return []
    now = encoding_record(schema)
    out: list[str] = []
    if record.get("dataset") != now["dataset"]:
        out.append(f"dataset {record.get('dataset')!r} -> {now['dataset']!r}")
    for kind in ("sparse", "dense"):
        old = {f["name"]: f for f in record.get(kind) or []}
        new = {f["name"]: f for f in now[kind]}
        gone, added = [n for n in old if n not in new], [n for n in new if n not in old]
        if gone:
            out.append(f"{kind} features missing now: {gone}")
        if added:
            out.append(f"{kind} features new now: {added}")
        if not gone and not added and list(old) != list(new):
            out.append(f"{kind} features in another order")
        for name in (n for n in new if n in old):
            a, b = old[name], new[name]
            if kind == "sparse":
                if a.get("vocab_size") != b["vocab_size"]:
                    out.append(f"feature {name!r}: vocabulary {a.get('vocab_size')} -> {b['vocab_size']} values")
                elif a.get("values_sha256") != b["values_sha256"]:
                    out.append(f"feature {name!r}: same size, other vocabulary values (another index per value)")
                if a.get("edges") != b["edges"]:
                    out.append(f"feature {name!r}: other bucket edges")
            elif (a.get("min"), a.get("max")) != (b["min"], b["max"]):
                out.append(f"dense {name!r}: range [{a.get('min')}, {a.get('max')}] -> [{b['min']}, {b['max']}]")
    if record.get("tasks") != now["tasks"]:
        out.append(f"tasks {record.get('tasks')} -> {now['tasks']}")
    if not out:
        out.append("the fingerprint differs but no recorded part does (a record written by another EMM version?)")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])
