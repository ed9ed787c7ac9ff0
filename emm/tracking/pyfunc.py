"""The scorable model bundle: raw feature rows in, one probability column per task out.

A bundle is ``model.json`` (which builder, its JSON config, the output tasks), ``weights.safetensors``,
``schema.json`` and ``vocabulary.parquet``: the same encoder as ingestion maps raw values to indices
(unseen -> reserved 0), so ``mlflow.pyfunc.load_model(uri).predict(df)`` scores raw rows. The torch module is
rebuilt from its spec, never unpickled, and ``model.json`` may only name a builder from ``BUILDERS``.

Why the pyfunc is logged from code (``scorer_model.py``, MLflow's "models from code") and not as an
object: an object is cloudpickled into ``python_model.pkl``, and unpickling a model file runs whatever
code the file says. Logged from code, the model folder holds a readable Python file, JSON, Parquet and
safetensors, and nothing is pickled.

Why the input signature types every column as ``Any``: raw rows come as CSV strings, int64 (UCI's
``73``), float or numeric strings, and MLflow's typed enforcement refuses some of them (int64 -> double
"can not safely convert"). The signature still names every required column (MLflow checks they are
there); the values are checked where a bad one can be named, by ``validate_rows``, on every value's text
form (``raw_text``), so the same value scores the same whatever its dtype.

Why a frame with bad rows is refused whole (``Scorer.predict``): a score for each good row and none for
the bad ones would make the answer shorter than the request, or need a placeholder a caller could take
for a score. So no row is scored, and the message names every bad row (0-based, in the order given) and
its column, for the caller to fix and send again; ``emm predict`` validates with the same
``validate_rows`` and writes the bad rows to a rejects file instead. The pyfunc raises ``InputRefused``,
which MLflow's scoring server answers with a 400 carrying that message and no traceback.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec
from mlflow.types.schema import Schema as MlflowSchema

from emm.data.encoding import Encoder
from emm.data.schema import SCHEMA_FILE, VOCAB_FILE, Schema
from emm.data.tensors import frame_to_tensors
from emm.errors import EMMError
from emm.train.predict import predict_proba
from emm.weights import load_module

PIP_REQUIREMENTS = ["torch", "pandas", "pyarrow", "safetensors", "scikit-learn", "pydantic"]
# The only builders a bundle may name: a model file must not be able to make us import and call anything.
BUILDERS = ("emm.models.pool:build_from_config", "emm.fusion.saved:build_from_config",
            "emm.train.compact:build_from_config")
COMPACT_MODEL_BUILDER = BUILDERS[2]  # the compact model of ``emm compress``
# The models-from-code file MLflow copies into every logged model (it calls mlflow.models.set_model).
SCORER_CODE = Path(__file__).with_name("scorer_model.py")
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
        return pd.Series(values.fillna("").str.strip().to_numpy(dtype=object), index=values.index, dtype=object)
    return pd.Series([_value_text(v) for v in values.to_numpy(dtype=object)], index=values.index, dtype=object)


def validate_rows(frame: pd.DataFrame, sparse: list[str], dense: list[str]) -> pd.Series:
    """A reason per row ('' = fine); ``frame`` holds the input columns as text (``raw_text``).

    The one rule for what can be scored, shared by ``emm predict`` (bad rows to the rejects file) and the
    pyfunc (a frame with bad rows refused): a required value missing, or a dense value not a finite number."""
    reasons = pd.Series("", index=frame.index, dtype=object)
    for col in sparse + dense:
        empty = frame[col].eq("")
        reasons[empty & reasons.eq("")] = f"missing value in {col!r}"
    for col in dense:
        numbers = pd.to_numeric(frame[col], errors="coerce")
        bad = ~np.isfinite(numbers.to_numpy(dtype=float)) & reasons.eq("")
        reasons[bad] = f"{col!r} is not a number"
    return reasons


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


class InputRefused(MlflowException, EMMError):
    """An ``EMMError`` about the input rows, as MLflow's scoring server answers a bad request: 400, this message.

    Why: the server answers any other exception with a generic 400 whose ``stack_trace`` holds the real
    message among the server's file paths; an ``MlflowException`` with INVALID_PARAMETER_VALUE is answered
    with its own message and no trace. Still an ``EMMError``: a Python caller of the pyfunc catches what
    ``Scorer`` raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


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


class EMMScorer(mlflow.pyfunc.PythonModel):
    """The pyfunc: a ``Scorer`` over the model's ``bundle`` artifact. Set by ``scorer_model.py``, never pickled."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's type
        self.scorer = Scorer(Path(context.artifacts[BUNDLE]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: ANN001
        try:
            return self.scorer.predict(model_input)
        except EMMError as exc:  # a bad request, to be answered with this message (``InputRefused``)
            raise InputRefused(str(exc)) from exc


def write_bundle(folder: Path, *, builder: str, config: dict[str, Any], outputs: list[str],
                 weights: Path, data_dir: Path) -> None:
    """Everything the pyfunc needs: model.json, weights.safetensors (a copy of ``weights``),
    schema.json and vocabulary.parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps({"builder": builder, "config": config, "outputs": outputs},
                                                  indent=2))
    shutil.copyfile(weights, folder / "weights.safetensors")
    for name in (SCHEMA_FILE, VOCAB_FILE):
        shutil.copyfile(Path(data_dir) / name, folder / name)


def input_signature(scorer: Scorer, output_example: pd.DataFrame) -> ModelSignature:
    """Every raw input column, required, of type Any (see the module doc); outputs as inferred."""
    inputs = MlflowSchema([ColSpec(AnyType(), name=c, required=True) for c in scorer.input_columns])
    return ModelSignature(inputs=inputs, outputs=infer_signature(output_example, output_example).outputs)


def log_scorer(name: str, *, builder: str, config: dict[str, Any], outputs: list[str], weights: Path,
               data_dir: Path, input_example: pd.DataFrame, registered_name: str | None = None):
    """Log the pyfunc from code (``SCORER_CODE``) with its bundle, signature and input example;
    optionally register a new version."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / BUNDLE
        write_bundle(bundle, builder=builder, config=config, outputs=outputs, weights=weights,
                     data_dir=data_dir)
        scorer = Scorer(bundle)
        signature = input_signature(scorer, scorer.predict(input_example))
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(SCORER_CODE), artifacts={BUNDLE: str(bundle)},
            signature=signature, input_example=input_example,
            pip_requirements=PIP_REQUIREMENTS, registered_model_name=registered_name,
        )
    return info


def raw_example(data_dir: Path, split: str = "test", rows: int = 5) -> pd.DataFrame:
    """A few rows of an ingested split decoded back to raw values: the pyfunc's input example."""
    schema = Schema.load(data_dir)
    encoder = Encoder.load(data_dir, schema)
    frame = pq.read_table(Path(data_dir) / f"{split}.parquet").slice(0, rows).to_pandas()
    if frame.empty:
        raise EMMError(f"{data_dir}/{split}.parquet has no rows for an input example")
    return encoder.decode(frame)
