"""Turning raw string columns into model inputs: labels, min-max dense values, vocabulary indices.

Quantile buckets of dense columns (``dense_buckets`` in a declaration): each bucketed dense column also
becomes a sparse feature ``<column>_bucket`` whose value is its quantile bin. Why: a min-max scaled,
heavy-tailed column (Census ``capital_gains``: 96% zeros, max 99,999) is nearly flat for an MLP, while a
tree splits it anywhere; a learned embedding per bin gives the network the same freedom (README "Data"
has the measurement). The dense value stays an input too.
Edges are the quantiles of a uniform sample (``BUCKET_SAMPLE`` values per column, priority sampling, so
memory stays bounded on any file size and the result does not depend on chunking).

Why one ``Encoder`` for ingestion *and* scoring: ``emm predict`` must encode a user's raw rows with
exactly the vocabularies and ranges the model was trained with; any second implementation would drift.
Every rule here (vocabulary lookup, canonical code, number parsing, scaling, bucket) runs once per distinct
value of a column and reaches the rows by one gather (``emm.data.distinct``): no per-row Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from emm.data.distinct import Distinct, arrow_text, distinct
from emm.data.schema import VOCAB_FILE, vocab_digest
from emm.data.spec import TaskSpec
from emm.errors import EMMError

BUCKET_SUFFIX = "_bucket"
BUCKET_SAMPLE = 1 << 20     # values kept per column to place the quantile edges
BUCKET_SEED = 2026          # priority-sampling keys: the same raw files always give the same edges


Lines = int | np.ndarray | None
"""Where a chunk's rows sit in their file: the line of its first row (rows on consecutive lines), every row's
own line (when blank lines lie between rows), or None (rows that come from no file, e.g. a frame to score)."""


def where(source: str, line: int | None, column: str) -> str:
    return f"{source}, line {line}, column {column!r}" if line is not None else f"{source}, column {column!r}"


def encode_labels(values: pd.Series, task: TaskSpec, *, source: str, first_line: Lines,
                  name: str | None = None) -> np.ndarray:
    """float32 labels: 1, 0, or NaN for a declared missing value (``TaskSpec.missing_values``).

    An empty (without ``missing_values`` declaring it), undeclared or (for threshold rules) non-numeric
    label is an error, never a silent 0. Undeclared means: the task lists its ``negative_values`` and the
    value is in none of the lists (a typo or a new category in the file would otherwise silently become a
    negative). Why NaN: it is what tensors carry for "no label" (see ``emm.data.labels``); ingest turns it
    into a Parquet null.
    """
    missing = (values.isin(task.missing_values).to_numpy() if task.missing_values
               else np.zeros(len(values), dtype=bool))
    empty = values.eq("").to_numpy() & ~missing
    if empty.any():
        pos = int(np.argmax(empty))
        raise EMMError(f"{where(source, _line(first_line, pos), task.column)}: the label is missing (declare "
                       f"missing_values: [\"\"] for the task if rows without a label are intended)")
    if task.positive_values is not None:
        positive = values.isin(task.positive_values).to_numpy()
        if task.negative_values is not None:
            unknown = ~(positive | values.isin(task.negative_values).to_numpy() | missing)
            if unknown.any():
                pos = int(np.argmax(unknown))
                of = f" of task {name!r}" if name else ""
                extra = f" nor a missing value {task.missing_values}" if task.missing_values else ""
                raise EMMError(f"{where(source, _line(first_line, pos), task.column)}: label {values.iloc[pos]!r}{of} "
                               f"is neither a positive value {task.positive_values} nor a declared negative value "
                               f"{task.negative_values}{extra}; fix the file, or add the value to one of the lists")
        labels = positive.astype(np.float32)
    else:
        numbers = to_numbers(values)
        bad = np.isnan(numbers) & ~missing
        if bad.any():
            pos = int(np.argmax(bad))
            raise EMMError(f"{where(source, _line(first_line, pos), task.column)}: label {values.iloc[pos]!r} "
                           f"is not a number")
        labels = (numbers > task.threshold).astype(np.float32)
    labels[missing] = np.nan
    return labels


def parse_dense(values: pd.Series, column: str, *, source: str, first_line: Lines,
                missing: str = "error") -> np.ndarray:
    """Float values; a non-numeric, NaN or infinite value names its file, line and column.

    Each distinct value is parsed once (``emm.data.distinct``); a column that is not all text (an object
    column holding numbers) is parsed row by row by pandas, as it always was."""
    found = distinct(values)
    if not found.all_text():
        return _parse_dense_rows(values, column, source=source, first_line=first_line, missing=missing)
    return _dense_table(found, column, source=source, first_line=first_line, missing=missing)[found.codes]


MISSING_WORDS = ["nan", "na", "null", "?"]  # dense values that mean "missing" (any case), besides ""


def to_numbers(values: pd.Series) -> np.ndarray:
    """``pd.to_numeric(values, errors="coerce")`` as float64 (NaN: not a number), parsed once per distinct value:
    the one reading of a dense text value, for the encoder and for whoever checks rows before scoring."""
    found = distinct(values)
    if not found.all_text():
        return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    return _number_table(found)[found.codes]


def _number_table(found: Distinct) -> np.ndarray:
    """float64 per distinct value, then NaN for missing rows (code -1 picks the last).

    Why a missing row's NaN is parsed along: pandas picks how to read a column (integers, or floats) from
    the kinds of values in it, a null included, so the distinct values are parsed as their column would be."""
    text = np.append(found.values, np.nan)
    if not found.has_missing:
        text = text[:-1]
    numbers = np.array(pd.to_numeric(pd.Series(text, dtype=object), errors="coerce"), dtype=np.float64)  # writable
    return numbers if found.has_missing else np.append(numbers, np.nan)


def _dense_table(found: Distinct, column: str, *, source: str, first_line: Lines, missing: str) -> np.ndarray:
    """float64 per distinct value, then one entry for missing rows (code -1 picks the last): the numbers of
    ``parse_dense`` before the gather, with its checks and messages."""
    n = len(found.values)
    numbers = _number_table(found)
    text = pd.Series(found.values, dtype=object)
    bad = ~np.isfinite(numbers)
    bad[n] = found.has_missing
    if bad.any():
        empty = np.append((text.eq("") | text.str.lower().isin(MISSING_WORDS)).to_numpy(dtype=bool), False)
        unfixable = bad & ~empty if missing == "zero" else bad
        if not unfixable.any():
            numbers[bad] = 0.0
        else:  # the first row that is not imputed: with dense_missing zero, an empty row before it is no error
            pos = int(np.argmax(unfixable[found.codes]))
            code = int(found.codes[pos])
            raw = found.values[code] if code >= 0 else found.column.iloc[pos]
            what = "is missing" if empty[code] else f"{raw!r} is not a finite number"
            raise EMMError(f"{where(source, _line(first_line, pos), column)}: dense value {what}"
                           + ("" if missing == "zero" else " (set dense_missing: zero to impute 0)"))
    return numbers


def _parse_dense_rows(values: pd.Series, column: str, *, source: str, first_line: Lines,
                      missing: str = "error") -> np.ndarray:
    """``parse_dense`` on every row: for a column whose values are not all text."""
    numbers = np.array(pd.to_numeric(values, errors="coerce"), dtype=np.float64)  # writable: imputed below
    bad = ~np.isfinite(numbers)
    if bad.any():
        empty = values.eq("").to_numpy() | values.str.lower().isin(MISSING_WORDS).to_numpy()
        unfixable = bad & ~empty if missing == "zero" else bad
        if not unfixable.any():
            numbers[bad] = 0.0
        else:
            pos = int(np.argmax(unfixable))
            raw = values.iloc[pos]
            what = "is missing" if empty[pos] else f"{raw!r} is not a finite number"
            raise EMMError(f"{where(source, _line(first_line, pos), column)}: dense value {what}"
                           + ("" if missing == "zero" else " (set dense_missing: zero to impute 0)"))
    return numbers


_INTEGRAL_FLOAT = re.compile(r"[+-]?\d+\.0*")


def _canonical(uniques: np.ndarray) -> np.ndarray:
    out = uniques.astype(object, copy=True)
    for i, value in enumerate(out):
        if isinstance(value, str) and "." in value and _INTEGRAL_FLOAT.fullmatch(value):
            out[i] = str(int(value.split(".", 1)[0]))
    return out


def canonical_codes(values: pd.Series) -> pd.Series:
    """Categorical values with integral floats spelled as integers ('37.0' -> '37'); all others unchanged.

    Why: an integer code column that passed through a float (a pandas int column with one gap, a Parquet
    float column, a CSV written from either) spells 37 as '37.0'. Without this the vocabulary would hold both
    spellings (two embeddings for one category) and a '37.0' at scoring time would be 'unseen'. The price:
    a column whose text '1' and '1.0' are meant as two categories gets one; codes are never meant so.
    Works on the distinct values only, so the cost does not grow with the rows.
    """
    codes, uniques = pd.factorize(values.to_numpy())
    fixed = _canonical(np.asarray(uniques, dtype=object))
    if len(codes) == 0 or all(a is b for a, b in zip(fixed, uniques)):
        return values
    return pd.Series(np.where(codes >= 0, fixed[np.maximum(codes, 0)], values.to_numpy()), index=values.index)


def _distinct_text(values: pd.Series) -> Distinct:
    """Raw values as stripped strings, as distinct values and codes; ingestion chunks already are text, user
    frames for scoring may not be. An object column of strings is taken as it is."""
    if values.dtype == object and (len(values) == 0 or isinstance(values.iloc[0], str)):
        return distinct(values)
    if arrow_text(values):  # pandas' own string column: stripped once per distinct value
        return distinct(values, strip=True)
    return distinct(values.astype(str).str.strip())


def _line(lines: Lines, pos: int) -> int | None:
    if lines is None:
        return None
    if isinstance(lines, np.ndarray):
        return int(lines[pos])
    return lines + pos


@dataclass
class Encoder:
    """Fitted vocabularies (value -> 1..V, 0 = unseen), min-max ranges and quantile-bucket edges.

    ``sparse`` holds the raw categorical columns; ``bucketed`` the dense columns that also get a bucket
    feature (see the module doc), which come after them in :attr:`sparse_features`.
    """

    sparse: list[str]
    dense: list[str]
    bucketed: list[str] = field(default_factory=list)
    n_buckets: int = 0
    vocab: dict[str, list[str]] = field(default_factory=dict)
    minimum: dict[str, float] = field(default_factory=dict)
    maximum: dict[str, float] = field(default_factory=dict)
    edges: dict[str, list[float]] = field(default_factory=dict)
    _seen: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _sample: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(BUCKET_SEED), repr=False)
    _index: dict[str, dict[str, int]] = field(default_factory=dict, repr=False)

    @staticmethod
    def bucket_name(col: str) -> str:
        return col + BUCKET_SUFFIX

    @property
    def sparse_features(self) -> list[str]:
        """Every sparse input in schema order: raw categorical columns, then the bucket features."""
        return self.sparse + [self.bucket_name(c) for c in self.bucketed]

    # ---- fitting (streamed: one chunk at a time) -------------------------------------------------
    def partial_fit(self, frame: pd.DataFrame, *, source: str, first_line: Lines, missing: str) -> None:
        for col in self.sparse:
            values = frame[col]
            if arrow_text(values):  # the reader's chunks: distinct values by one Arrow hash pass
                found = distinct(values)
                uniques = np.append(found.values, np.nan) if found.has_missing else found.values
            else:
                uniques = pd.unique(values.to_numpy())
            self._seen.setdefault(col, set()).update(_canonical(uniques))
        for col in self.dense:
            x = parse_dense(frame[col], col, source=source, first_line=first_line, missing=missing)
            self.minimum[col] = min(self.minimum.get(col, np.inf), float(x.min()))
            self.maximum[col] = max(self.maximum.get(col, -np.inf), float(x.max()))
            if col in self.bucketed:
                self._keep_sample(col, x)

    def _keep_sample(self, col: str, x: np.ndarray) -> None:
        """Priority sampling: every value gets a uniform key and the BUCKET_SAMPLE smallest keys stay, so
        the kept values are a uniform sample of everything seen, whatever the chunking."""
        keys = self._rng.random(len(x))
        if col in self._sample:
            old_keys, old_x = self._sample[col]
            keys, x = np.concatenate([old_keys, keys]), np.concatenate([old_x, x])
        if len(keys) > BUCKET_SAMPLE:
            keep = np.argpartition(keys, BUCKET_SAMPLE)[:BUCKET_SAMPLE]
            keys, x = keys[keep], x[keep]
        self._sample[col] = (keys, x)

    def finish(self) -> None:
        """Sort vocabularies so that indices do not depend on row order or chunking; place bucket edges."""
        self.vocab = {c: sorted(self._seen.get(c, ())) for c in self.sparse}
        for col in self.bucketed:
            self.edges[col] = bucket_edges(self._sample.get(col, (None, np.zeros(1)))[1], self.n_buckets)
            self.vocab[self.bucket_name(col)] = bucket_labels(self.edges[col])
        self._seen, self._sample = {}, {}
        self._index = {}

    # ---- transforming ------------------------------------------------------------------------------
    def index(self, col: str) -> dict[str, int]:
        """Vocabulary value -> its index (1..V) for ``col``; built once."""
        if col not in self._index:
            self._index[col] = {value: i for i, value in enumerate(self.vocab[col], 1)}
        return self._index[col]

    def encode_sparse(self, values: pd.Series, col: str) -> np.ndarray:
        """Vocabulary indices of the canonical values (see ``canonical_codes``), looked up once per distinct value."""
        return self._sparse_indices(distinct(values), col)

    def _sparse_indices(self, found: Distinct, col: str) -> np.ndarray:
        """1..V per row, 0 for a value outside the vocabulary and for a missing one (a scoring frame's None/NaN)."""
        index = self.index(col)
        table = np.zeros(len(found.values) + 1, dtype=np.int32)  # the last entry: missing rows (code -1)
        table[:-1] = [index.get(value, 0) for value in _canonical(found.values)]
        return table[found.codes]

    def scale_dense(self, x: np.ndarray, col: str) -> np.ndarray:
        lo, hi = self.minimum[col], self.maximum[col]
        if hi <= lo:
            return np.zeros_like(x, dtype=np.float32)
        return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)

    def bucketize(self, x: np.ndarray, col: str) -> np.ndarray:
        """Bin ``k`` in 1..len(edges)+1 holds ``edges[k-2] < x <= edges[k-1]`` (0 stays 'unseen')."""
        return (np.searchsorted(np.asarray(self.edges[col]), x, side="left") + 1).astype(np.int32)

    def transform(self, frame: pd.DataFrame, *, source: str, first_line: Lines,
                  missing: str = "error") -> pd.DataFrame:
        """Encoded features in schema order (sparse local indices, bucket indices, then scaled dense)."""
        missing_cols = [c for c in self.sparse + self.dense if c not in frame.columns]
        if missing_cols:
            raise EMMError(f"{source}: missing required column(s) {missing_cols}")
        out = {col: self._sparse_indices(_distinct_text(frame[col]), col) for col in self.sparse}
        buckets: dict[str, np.ndarray] = {}
        dense: dict[str, np.ndarray] = {}
        for col in self.dense:  # scaled and bucketed once per distinct value, then gathered
            found = _distinct_text(frame[col])
            rows: np.ndarray | slice = found.codes
            if found.all_text():
                numbers = _dense_table(found, col, source=source, first_line=first_line, missing=missing)
            else:  # an object column holding numbers among its strings: parsed row by row
                numbers, rows = _parse_dense_rows(found.column, col, source=source, first_line=first_line,
                                                  missing=missing), slice(None)
            if col in self.bucketed:
                buckets[self.bucket_name(col)] = self.bucketize(numbers, col)[rows]
            dense[col] = self.scale_dense(numbers, col)[rows]
        return pd.DataFrame({**out, **buckets, **dense}, copy=False)

    def decode(self, encoded: pd.DataFrame) -> pd.DataFrame:
        """Encoded rows back to raw-like values (index 0 -> '<unseen>'): input examples for scoring."""
        out: dict[str, object] = {}
        for col in self.sparse:
            vocab = np.array(["<unseen>", *self.vocab[col]], dtype=object)
            out[col] = vocab[encoded[col].to_numpy()]
        for col in self.dense:
            lo, hi = self.minimum[col], self.maximum[col]
            x = encoded[col].to_numpy(dtype=np.float64) * (hi - lo) + lo
            name = self.bucket_name(col)
            if col in self.bucketed and name in encoded.columns:
                # the float32 scaled value is a rounded copy of the raw one; keep it inside its recorded bin
                # so that encoding the decoded rows again gives the same bucket (edges sit on raw values)
                edges = np.asarray(self.edges[col], dtype=np.float64)
                bins = encoded[name].to_numpy().astype(np.int64)
                lower = np.concatenate([[-np.inf], edges])[np.clip(bins - 1, 0, len(edges))]
                upper = np.concatenate([edges, [np.inf]])[np.clip(bins - 1, 0, len(edges))]
                x = np.where(x <= lower, np.nextafter(lower, np.inf), np.minimum(x, upper))
            out[col] = x
        return pd.DataFrame(out)

    # ---- persistence ---------------------------------------------------------------------------------
    def save_vocabulary(self, path: Path) -> None:
        feats, values, idx = [], [], []
        for col in self.sparse_features:
            vals = self.vocab[col]
            feats.extend([col] * len(vals))
            values.extend(vals)
            idx.extend(range(1, len(vals) + 1))
        table = pa.table({"feature": pa.array(feats, pa.string()), "value": pa.array(values, pa.string()),
                          "index": pa.array(idx, pa.int32())})
        pq.write_table(table, path)

    @classmethod
    def load(cls, folder: Path, schema: "Schema") -> "Encoder":  # noqa: F821 (forward ref, avoids a cycle)
        path = Path(folder) / VOCAB_FILE
        if not path.exists():
            raise EMMError(f"{path} does not exist: rerun `emm ingest` to write the vocabulary")
        table = pq.read_table(path).to_pandas()
        buckets = [f for f in schema.sparse if f.bucket_of is not None]
        enc = cls(sparse=[f.name for f in schema.sparse if f.bucket_of is None],
                  dense=[f.name for f in schema.dense], bucketed=[f.bucket_of for f in buckets],
                  edges={f.bucket_of: list(f.edges or []) for f in buckets})
        for col, group in table.groupby("feature", sort=False):
            enc.vocab[col] = group.sort_values("index")["value"].tolist()
        for f in schema.sparse:
            enc.vocab.setdefault(f.name, [])
            if len(enc.vocab[f.name]) + 1 != f.vocab_size:
                raise EMMError(f"{path}: feature {f.name!r} has {len(enc.vocab[f.name])} values but schema.json "
                               f"says {f.vocab_size - 1}: the two files come from different ingestions")
            if f.values_sha256 is not None and vocab_digest(enc.vocab[f.name]) != f.values_sha256:
                raise EMMError(f"{path}: feature {f.name!r} holds other values than schema.json records (same "
                               f"count, other contents or order): the two files come from different ingestions; "
                               f"rerun `emm ingest`")
        for f in schema.dense:
            enc.minimum[f.name], enc.maximum[f.name] = f.min, f.max
        return enc


def bucket_edges(sample: np.ndarray, n_buckets: int) -> list[float]:
    """Quantile edges; a value holding more than one bin's share of the rows gets a bin of its own.

    Why the special case: on a zero-inflated column (Census ``capital_gains``: 96% zeros) plain quantiles
    collapse into ``{0, one high value}``, 3 bins in all; placing the quantiles on the *other* values
    gives the non-zero range its full resolution. Measured on Census income (one MLP, two seeds): test
    AUC 0.9519 with plain quantile edges, 0.9543 with this rule.
    """
    sample = np.asarray(sample, dtype=np.float64)
    inner = np.linspace(0.0, 1.0, n_buckets + 1)[1:-1]
    values, counts = np.unique(sample, return_counts=True)
    mode = values[np.argmax(counts)]
    if counts.max() > len(sample) / n_buckets and len(values) > 1:
        rest = sample[sample != mode]
        edges = np.concatenate([[mode], np.quantile(rest, inner)])
    else:
        edges = np.quantile(sample, inner)
    return [float(e) for e in np.unique(edges)]


def bucket_labels(edges: list[float]) -> list[str]:
    """Human-readable bins for ``vocabulary.parquet``: ``<= e0``, ``(e0, e1]``, ..., ``> e_last``."""
    if not edges:
        return ["all"]
    inner = [f"({lo:g}, {hi:g}]" for lo, hi in zip(edges, edges[1:])]
    return [f"<= {edges[0]:g}", *inner, f"> {edges[-1]:g}"]
