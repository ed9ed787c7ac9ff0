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
there); the types are checked where a bad value can be named, by the encoder, which parses every value
from its text form (``raw_text``), so the same value scores the same whatever its dtype.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from mlflow.models import ModelSignature, infer_signature
from mlflow.types.schema import AnyType, ColSpec
from mlflow.types.schema import Schema as MlflowSchema

from emm.data.encoding import Encoder
from emm.data.schema import SCHEMA_FILE, VOCAB_FILE, Schema
from emm.data.tensors import frame_to_tensors
from emm.errors import EMMError
from emm.train.trainer import predict_proba
from emm.weights import load_module

PIP_REQUIREMENTS = ["torch", "pandas", "pyarrow", "safetensors", "scikit-learn", "pydantic"]
# The only builders a bundle may name: a model file must not be able to make us import and call anything.
BUILDERS = ("emm.models.pool:build_from_config", "emm.fusion.saved:build_from_config")
# The models-from-code file MLflow copies into every logged model (it calls mlflow.models.set_model).
SCORER_CODE = Path(__file__).with_name("scorer_model.py")
BUNDLE = "bundle"  # the pyfunc artifact holding the bundle: <model>/artifacts/bundle/


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

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw rows (any dtypes, extra columns ignored) -> ``score_<task>`` columns, one row per input row."""
        missing = [c for c in self.input_columns if c not in frame.columns]
        if missing:
            raise EMMError(f"model input lacks required column(s) {missing}; the model needs the raw columns "
                           f"{self.input_columns}")
        text = pd.DataFrame({c: raw_text(frame[c]) for c in self.input_columns}).reset_index(drop=True)
        encoded = self.encoder.transform(text, source="model input", first_line=None)
        tensors = frame_to_tensors(encoded, self.schema, with_labels=False)
        probs = predict_proba(self.model, tensors)
        return pd.DataFrame(probs, columns=[f"score_{t}" for t in self.outputs])


class EMMScorer(mlflow.pyfunc.PythonModel):
    """The pyfunc: a ``Scorer`` over the model's ``bundle`` artifact. Set by ``scorer_model.py``, never pickled."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's type
        self.scorer = Scorer(Path(context.artifacts[BUNDLE]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: ANN001
        return self.scorer.predict(model_input)


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
