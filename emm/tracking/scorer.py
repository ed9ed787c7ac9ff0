"""A logged model's bundle read back for scoring: raw feature rows in, one probability column per task out.

The bundle (``model.json``: which builder, its JSON config, the output tasks; ``weights.safetensors``;
``schema.json``; ``vocabulary.parquet``) is what ``emm.tracking.pyfunc`` logs; ``Scorer`` rebuilds the torch
module from it, never unpickled, through a builder ``model.json`` may only name from ``BUILDERS``, and maps raw
values to indices with the same encoder as ingestion (unseen -> reserved 0).

Why apart from ``emm.tracking.pyfunc``: ``emm predict`` scores with exactly this code but needs none of MLflow's
(the pyfunc class, signatures, logging), and importing MLflow is a large part of a short run's wall time. So
this module imports no MLflow; the pyfunc wraps its ``Scorer`` and re-exports its names.

Why every value is checked in its text form (``raw_text``, ``validate_rows``): raw rows come as CSV strings,
int64 (UCI's ``73``), float or numeric strings; ingestion read every value as text, so text is the one form in
which they meet the encoder as the same value, and a bad value can be named whatever its dtype.

Why a frame with bad rows is refused whole (``Scorer.predict``): a score for each good row and none for the
bad ones would make the answer shorter than the request, or need a placeholder a caller could take for a
score. So no row is scored, and the message names every bad row (0-based, in the order given) and its
column, for the caller to fix and send again; ``emm predict`` validates with the same ``validate_rows`` and
writes the bad rows to a rejects file instead.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from emm.data.distinct import arrow_text, distinct
from emm.data.encoding import Encoder, to_numbers
from emm.data.schema import Schema
from emm.data.tensors import frame_to_tensors
from emm.errors import EMMError
from emm.train.predict import predict_proba
from emm.weights import load_module

# The only builders a bundle may name: a model file must not be able to make us import and call anything.
BUILDERS = ("emm.models.pool:build_from_config", "emm.fusion.saved:build_from_config",
            "emm.train.compact:build_from_config")
COMPACT_MODEL_BUILDER = BUILDERS[2]  # the compact model of ``emm compress``
BUNDLE = "bundle"  # the pyfunc artifact holding the bundle: <model>/artifacts/bundle/
SHOWN_BAD_ROWS = 20  # bad rows a refusal names one by one; the rest it counts
# Rows per forward pass when scoring. Why this small: every layer's output for the batch should stay in the CPU's
# cache; at tens of thousands of rows each intermediate (a few hundred floats per row) spills to main memory and a
# small model (the compact one above all) waits on memory instead of computing (harness/benchmarks/score_speed.py).
SCORE_BATCH_ROWS = 4096


def resolve_builder(name: str, where: Path | str) -> Callable[..., Any]:
    """The builder function ``name`` refers to, if it is one of ``BUILDERS``."""
    if name not in BUILDERS:
        raise EMMError(f"{where} names builder {name!r}, which is not one of EMM's model builders {list(BUILDERS)}; "
                       "refusing to import it. Log the model again with this version of EMM")
    module_name, fn_name = name.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def _value_text(value: Any) -> str:
    """One raw value as ingestion would have read it from a file: stripped text, '' when missing."""
    if isinstance(value, str):
        return value.strip()
    if value is None or (np.ndim(value) == 0 and not isinstance(value, (bool, np.bool_)) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        # an integral float is the integer a file would hold ("4", not "4.0": vocabularies are raw text)
        return str(int(number)) if math.isfinite(number) and number.is_integer() else repr(number)
    return str(value).strip()


def raw_text(values: pd.Series) -> pd.Series:
    """A column of any dtype (str, int, float, nullable, mixed object) as stripped text ('' = missing).

    Why text: ingestion read every value as text, so text is the one form in which an int64 ``73``, a
    float ``73.0`` and a string ``"73"`` meet the encoder as the same value (and a categorical code stored
    as a float, ``4.0``, still finds its vocabulary entry ``"4"``)."""
    if values.dtype.kind in "iu":  # numpy integers are never missing
        return pd.Series(values.astype(str).to_numpy(dtype=object), index=values.index, dtype=object)
    if isinstance(values.dtype, pd.StringDtype):
        text = values.fillna("").str.strip()
        # pandas' own Arrow-backed strings stay Arrow-backed: no Python string per value
        return text if arrow_text(text) else pd.Series(text.to_numpy(dtype=object), index=values.index, dtype=object)
    if values.dtype.kind == "f":  # a float column (Parquet): one text per distinct value, then a gather
        found = distinct(values)
        table = np.array([_value_text(v) for v in found.values] + [""], dtype=object)  # last: NaN rows (code -1)
        return pd.Series(table[found.codes], index=values.index, dtype=object)
    return pd.Series([_value_text(v) for v in values.to_numpy(dtype=object)], index=values.index, dtype=object)


def validate_rows(frame: pd.DataFrame, sparse: list[str], dense: list[str]) -> pd.Series:
    """A reason per row ('' = fine); ``frame`` holds the input columns as text (``raw_text``).

    The one rule for what can be scored, shared by ``emm predict`` (bad rows to the rejects file) and the
    pyfunc (a frame with bad rows refused): a required value missing, or a dense value not a finite number."""
    reasons = np.full(len(frame), "", dtype=object)
    open_rows = np.ones(len(frame), dtype=bool)  # rows without a reason yet: a row keeps the first one found

    def mark(hit: np.ndarray, reason: str) -> None:
        hit = hit & open_rows
        if hit.any():
            reasons[hit] = reason
            open_rows[hit] = False

    for col in sparse + dense:
        mark(frame[col].eq("").to_numpy(dtype=bool), f"missing value in {col!r}")
    for col in dense:  # parsed as the encoder parses them (once per distinct value): both agree on every value
        mark(~np.isfinite(to_numbers(frame[col])), f"{col!r} is not a number")
    return pd.Series(reasons, index=frame.index, dtype=object)


def bad_rows_message(reasons: pd.Series) -> str:
    """The refusal of a frame with bad rows (``validate_rows``): each named by position, the first
    ``SHOWN_BAD_ROWS`` of them, and what to do."""
    bad = np.flatnonzero(reasons.ne("").to_numpy())
    shown = "; ".join(f"row {i}: {reasons.iloc[i]}" for i in bad[:SHOWN_BAD_ROWS])
    more = f"; and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
    return (f"{len(bad)} of {len(reasons)} rows cannot be scored, so none was: {shown}{more} (rows count from 0, "
            "in the order given). Fix or drop those rows and send the rows again")


def refuse_repeated_columns(names: Sequence[Any], needed: Sequence[str], where: str, place: str = "",
                            unit: str | None = None) -> None:
    """An ``EMMError`` naming each required column that ``names`` holds more than once (positions 1-based,
    as ``unit``, when given); columns the model does not read may repeat.

    Why refuse: pandas scores the first of two same-named columns (a CSV's second ``age`` becomes
    ``age.1``), so a file with two ``age`` columns would score silently from one of them, which may not be
    the one meant."""
    wanted = set(needed)
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names, 1):
        if name in wanted:
            positions.setdefault(name, []).append(i)
    repeated = {name: at for name, at in positions.items() if len(at) > 1}
    if repeated:
        listed = "; ".join(
            f"column {name!r} appears {len(at)} times{place}"
            + (f" ({unit} {', '.join(map(str, at[:-1]))} and {at[-1]})" if unit else "")
            for name, at in repeated.items())
        raise EMMError(f"{where}: {listed}; the model reads each of its columns once and cannot tell which copy is "
                       "meant: remove or rename the extra copies")


class Scorer:
    """A bundle loaded for scoring: schema, encoder, the rebuilt torch module and its output tasks.

    Plain Python (no MLflow): ``emm predict`` builds one straight from a bundle folder, and the pyfunc
    (``EMMScorer``) wraps one, so both score with exactly this code."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        meta_path = folder / "model.json"
        if not meta_path.is_file():
            raise EMMError(f"{folder} is not an EMM model bundle (no model.json): log the model again with EMM")
        try:
            meta = json.loads(meta_path.read_text())
            builder_name, config, outputs = meta["builder"], meta["config"], list(meta["outputs"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EMMError(f"{meta_path} is not a valid EMM model description ({exc!r}); log the model again") from exc
        builder = resolve_builder(builder_name, meta_path)
        self.schema = Schema.load(folder)
        self.encoder = Encoder.load(folder, self.schema)
        self.model = builder(config, self.schema)
        load_module(self.model, folder / "weights.safetensors", what="logged model", fix="log the model again")
        if getattr(self.model, "output_members", []):  # a fused model's trees: their files unchanged, scored by
            from emm.fusion.saved import attach_output_files  # their library where installed (emm.models.tree_native)

            attach_output_files(self.model, folder)
        self.model.eval()
        self.outputs = outputs

    @property
    def sparse_columns(self) -> list[str]:
        """Raw categorical input columns (bucket features are derived from dense ones, not inputs)."""
        return list(self.encoder.sparse)

    @property
    def dense_columns(self) -> list[str]:
        return list(self.encoder.dense)

    @property
    def input_columns(self) -> list[str]:
        return self.sparse_columns + self.dense_columns

    def validate(self, text: pd.DataFrame) -> pd.Series:
        """``validate_rows`` for this model, a reason per row ('' = fine): what ``predict`` refuses and
        ``emm predict`` rejects. An empty categorical value the model was trained on (it is in the
        vocabulary: a raw file's empty field or null) is a value, not a missing one."""
        must_fill = [c for c in self.sparse_columns if "" not in self.encoder.vocab[c]]
        return validate_rows(text, must_fill, self.dense_columns)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw rows (any dtypes, extra columns ignored) -> ``score_<task>`` columns, one row per input row;
        a frame with a bad row (``validate_rows``) is refused whole, every bad row named."""
        missing = [c for c in self.input_columns if c not in frame.columns]
        if missing:
            raise EMMError(f"model input lacks required column(s) {missing}; the model needs the raw columns "
                           f"{self.input_columns}")
        refuse_repeated_columns(list(frame.columns), self.input_columns, "model input")
        text = pd.DataFrame({c: raw_text(frame[c]) for c in self.input_columns}).reset_index(drop=True)
        reasons = self.validate(text)
        if reasons.ne("").any():
            raise EMMError(bad_rows_message(reasons))
        return self.score_text(text)

    def score_text(self, text: pd.DataFrame) -> pd.DataFrame:
        """Score rows already in text form (``raw_text``) and found valid (``validate``): what ``predict``
        does after its checks, for a caller (``emm predict``) that ran them itself and kept the bad rows."""
        encoded = self.encoder.transform(text, source="model input", first_line=None)
        tensors = frame_to_tensors(encoded, self.schema, with_labels=False)
        probs = predict_proba(self.model, tensors, SCORE_BATCH_ROWS)
        return pd.DataFrame(probs, columns=[f"score_{t}" for t in self.outputs])
