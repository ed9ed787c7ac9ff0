"""``schema.json``: what the ingested data is, written by ``ingest`` and read by every later stage.

Why a fingerprint: a checkpoint trained on one schema silently produces garbage on another (shifted
embedding offsets, a missing feature). Every model artifact stores the fingerprint of the schema it was
trained on, and loading compares it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from emm.errors import EMMError
from emm.io import read_json, write_json

SCHEMA_FILE = "schema.json"
VOCAB_FILE = "vocabulary.parquet"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SparseFeature(_Frozen):
    name: str
    vocab_size: int = Field(description="known values + 1: index 0 is reserved for unseen values")
    offset: int = Field(description="where this feature's rows start in the one shared embedding table")
    bucket_of: str | None = Field(default=None, description="the dense column this feature buckets, if any")
    edges: list[float] | None = Field(default=None, description="quantile bin edges of a bucket feature")
    values_sha256: str | None = Field(
        default=None, description="vocab_digest of the known values in index order (None: schema from before "
        "it was recorded, or synthetic ids)"
    )


class DenseFeature(_Frozen):
    name: str
    min: float
    max: float


class TaskInfo(_Frozen):
    name: str
    column: str
    rule: dict[str, Any]
    positives: dict[str, int] = Field(description="labelled positive rows per split")
    positive_rate: dict[str, float] = Field(description="positives / labelled rows per split")
    labelled: dict[str, int] | None = Field(
        default=None, description="rows carrying this task's label per split (None: every row; schemas written "
        "before labels could be missing)"
    )


class RawFile(_Frozen):
    key: str
    path: str
    sha256: str
    bytes: int
    rows: int


class Schema(_Frozen):
    dataset: str
    sparse: list[SparseFeature]
    dense: list[DenseFeature]
    tasks: list[TaskInfo]
    rows: dict[str, int]
    raw_files: list[RawFile]
    encoding: dict[str, Any]
    provenance: dict[str, Any] = Field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def n_sparse(self) -> int:
        return len(self.sparse)

    @property
    def n_dense(self) -> int:
        return len(self.dense)

    @property
    def total_vocab(self) -> int:
        return sum(f.vocab_size for f in self.sparse)

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        raise EMMError(f"dataset {self.dataset!r} has no task {name!r} (its tasks: {self.task_names})")

    def labelled_rows(self, task: str, split: str) -> int:
        """Rows of ``split`` that carry ``task``'s label (all rows where the schema records no count)."""
        info = self.task(task)
        if split not in self.rows:
            raise EMMError(f"dataset {self.dataset!r} has no split {split!r} (its splits: {sorted(self.rows)})")
        if info.labelled is None:
            return self.rows[split]
        return info.labelled.get(split, 0)

    def fingerprint(self) -> str:
        """Hash of everything a trained model depends on: features and their order, tasks, and the encoding.

        The encoding part matters as much as the names: a model's embedding row ``k`` means "the k-th
        vocabulary value" and its dense inputs mean "(x - min) / (max - min)", so a re-ingest whose
        vocabulary contents or min/max ranges moved feeds the same model different numbers for the same raw
        rows, even when every name and size is unchanged. A ``label_fraction`` counts too: a model trained
        with most labels of a task held back is another model than one trained on all of them.
        """
        core = {
            "sparse": [(f.name, f.vocab_size, f.values_sha256) for f in self.sparse],
            "dense": [(f.name, f.min, f.max) for f in self.dense],
            "tasks": self.task_names,
            "bucket_edges": {f.name: f.edges for f in self.sparse if f.bucket_of is not None},
        }
        fractions = self.encoding.get("label_fraction")
        if fractions:  # only when set, so every schema from before label fractions keeps its fingerprint
            core["label_fraction"] = {k: fractions[k] for k in sorted(fractions)}
        return hashlib.sha256(json.dumps(core).encode()).hexdigest()[:16]

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / SCHEMA_FILE, self.model_dump(mode="json"))

    @classmethod
    def load(cls, folder: Path) -> "Schema":
        raw = read_json(Path(folder) / SCHEMA_FILE)
        try:
            return cls.model_validate(raw)
        except Exception as exc:  # pydantic's ValidationError, with the file named
            raise EMMError(f"{Path(folder) / SCHEMA_FILE} is not a valid EMM schema ({exc}); rerun `emm ingest`") from exc


def vocab_digest(values: list[str]) -> str:
    """sha256 of a feature's known values in index order (what ``SparseFeature.values_sha256`` records)."""
    return hashlib.sha256(json.dumps(list(values), ensure_ascii=False).encode()).hexdigest()


def check_fingerprint(expected: str, schema: Schema, what: str) -> None:
    """Raise a clear error when an artifact was built on another schema."""
    if expected != schema.fingerprint():
        raise EMMError(
            f"{what} was trained on a different data schema (fingerprint {expected}) than "
            f"{schema.dataset!r} now has ({schema.fingerprint()}): features, vocabularies, dense ranges or tasks "
            f"changed. "
            f"Retrain it (`emm pretrain`) on the current data, or re-ingest the data it was trained on."
        )
