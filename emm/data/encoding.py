"""Turning raw string columns into model inputs: labels, min-max dense values, vocabulary indices.

Why one ``Encoder`` for ingestion *and* scoring: ``emm predict`` must encode a user's raw rows with
exactly the vocabularies and ranges the model was trained with; any second implementation would drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from emm.data.spec import TaskSpec
from emm.errors import EMMError


def where(source: str, line: int | None, column: str) -> str:
    return f"{source}, line {line}, column {column!r}" if line is not None else f"{source}, column {column!r}"


def encode_labels(values: pd.Series, task: TaskSpec, *, source: str, first_line: int | None) -> np.ndarray:
    """0/1 labels; an empty or (for threshold rules) non-numeric label is an error, never a silent 0."""
    empty = values.eq("").to_numpy()
    if empty.any():
        pos = int(np.argmax(empty))
        raise EMMError(f"{where(source, _line(first_line, pos), task.column)}: the label is missing")
    if task.positive_values is not None:
        return values.isin(task.positive_values).to_numpy().astype(np.int8)
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(numbers)
    if bad.any():
        pos = int(np.argmax(bad))
        raise EMMError(f"{where(source, _line(first_line, pos), task.column)}: label {values.iloc[pos]!r} "
                       f"is not a number")
    return (numbers > task.threshold).astype(np.int8)


def parse_dense(values: pd.Series, column: str, *, source: str, first_line: int | None,
                missing: str = "error") -> np.ndarray:
    """Float values; a non-numeric, NaN or infinite value names its file, line and column."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers)
    if bad.any():
        empty = values.eq("").to_numpy() | values.str.lower().isin(["nan", "na", "null", "?"]).to_numpy()
        if missing == "zero" and not (bad & ~empty).any():
            numbers[bad] = 0.0
        else:
            pos = int(np.argmax(bad))
            raw = values.iloc[pos]
            what = "is missing" if empty[pos] else f"{raw!r} is not a finite number"
            raise EMMError(f"{where(source, _line(first_line, pos), column)}: dense value {what}"
                           + ("" if missing == "zero" else " (set dense_missing: zero to impute 0)"))
    return numbers


def _as_text(values: pd.Series) -> pd.Series:
    """Raw values as stripped strings; ingestion chunks already are, user frames for scoring may not be."""
    if values.dtype == object and (len(values) == 0 or isinstance(values.iloc[0], str)):
        return values
    return values.astype(str).str.strip()


def _line(first_line: int | None, pos: int) -> int | None:
    return None if first_line is None else first_line + pos


@dataclass
class Encoder:
    """Fitted vocabularies (value -> 1..V, 0 = unseen) and min-max ranges."""

    sparse: list[str]
    dense: list[str]
    vocab: dict[str, list[str]] = field(default_factory=dict)
    minimum: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    _seen: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _index: dict[str, pd.Index] = field(default_factory=dict, repr=False)

    # ---- fitting (streamed: one chunk at a time) -------------------------------------------------
    def partial_fit(self, frame: pd.DataFrame, *, source: str, first_line: int, missing: str) -> None:
        for col in self.sparse:
            self._seen.setdefault(col, set()).update(pd.unique(frame[col].to_numpy()))
        for col in self.dense:
            x = parse_dense(frame[col], col, source=source, first_line=first_line, missing=missing)
            self.minimum[col] = min(self.minimum.get(col, np.inf), float(x.min()))
            self.maximum[col] = max(self.maximum.get(col, -np.inf), float(x.max()))

    def finish(self) -> None:
        """Sort vocabularies so that indices do not depend on row order or chunking."""
        self.vocab = {c: sorted(self._seen.get(c, ())) for c in self.sparse}
        self._seen = {}
        self._index = {}

    # ---- transforming ------------------------------------------------------------------------------
    def index(self, col: str) -> pd.Index:
        if col not in self._index:
            self._index[col] = pd.Index(self.vocab[col])
        return self._index[col]

    def encode_sparse(self, values: pd.Series, col: str) -> np.ndarray:
        codes = self.index(col).get_indexer(values.to_numpy())
        return (codes + 1).astype(np.int32)  # -1 (unseen) -> 0, known -> 1..V

    def scale_dense(self, x: np.ndarray, col: str) -> np.ndarray:
        lo, hi = self.minimum[col], self.maximum[col]
        if hi <= lo:
            return np.zeros_like(x, dtype=np.float32)
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    def transform(self, frame: pd.DataFrame, *, source: str, first_line: int | None,
                  missing: str = "error") -> pd.DataFrame:
        """Encoded features in schema order (sparse local indices, then scaled dense)."""
        missing_cols = [c for c in self.sparse + self.dense if c not in frame.columns]
        if missing_cols:
            raise EMMError(f"{source}: missing required column(s) {missing_cols}")
        out: dict[str, np.ndarray] = {}
        for col in self.sparse:
            out[col] = self.encode_sparse(_as_text(frame[col]), col)
        for col in self.dense:
            x = parse_dense(_as_text(frame[col]), col, source=source, first_line=first_line,
                            missing=missing)
            out[col] = self.scale_dense(x, col)
        return pd.DataFrame(out)

    def decode(self, encoded: pd.DataFrame) -> pd.DataFrame:
        """Encoded rows back to raw-like values (index 0 -> '<unseen>'): input examples for scoring."""
        out: dict[str, object] = {}
        for col in self.sparse:
            vocab = np.array(["<unseen>", *self.vocab[col]], dtype=object)
            out[col] = vocab[encoded[col].to_numpy()]
        for col in self.dense:
            lo, hi = self.minimum[col], self.maximum[col]
            out[col] = encoded[col].to_numpy(dtype=np.float64) * (hi - lo) + lo
        return pd.DataFrame(out)

    # ---- persistence ---------------------------------------------------------------------------------
    def save_vocabulary(self, path: Path) -> None:
        feats, values, idx = [], [], []
        for col in self.sparse:
            vals = self.vocab[col]
            feats.extend([col] * len(vals))
            values.extend(vals)
            idx.extend(range(1, len(vals) + 1))
        table = pa.table({"feature": pa.array(feats, pa.string()), "value": pa.array(values, pa.string()),
                          "index": pa.array(idx, pa.int32())})
        pq.write_table(table, path)

    @classmethod
    def load(cls, folder: Path, schema: "Schema") -> "Encoder":  # noqa: F821 (forward ref, avoids a cycle)
        from emm.data.schema import VOCAB_FILE

        path = Path(folder) / VOCAB_FILE
        if not path.exists():
            raise EMMError(f"{path} does not exist: rerun `emm ingest` to write the vocabulary")
        table = pq.read_table(path).to_pandas()
        enc = cls(sparse=[f.name for f in schema.sparse], dense=[f.name for f in schema.dense])
        for col, group in table.groupby("feature", sort=False):
            enc.vocab[col] = group.sort_values("index")["value"].tolist()
        for f in schema.sparse:
            enc.vocab.setdefault(f.name, [])
            if len(enc.vocab[f.name]) + 1 != f.vocab_size:
                raise EMMError(f"{path}: feature {f.name!r} has {len(enc.vocab[f.name])} values but schema.json "
                               f"says {f.vocab_size - 1}: the two files come from different ingestions")
        for f in schema.dense:
            enc.minimum[f.name], enc.maximum[f.name] = f.min, f.max
        return enc
