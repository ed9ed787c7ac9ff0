"""The scorable model bundle logged to MLflow: raw feature rows in, one probability column per task out.

A bundle is ``model.json`` (which builder, its JSON config, the output tasks), ``weights.safetensors``,
``schema.json`` and ``vocabulary.parquet``; ``emm.tracking.scorer.Scorer`` scores with it (the same encoder as
ingestion, the torch module rebuilt from its spec, never unpickled), so
``mlflow.pyfunc.load_model(uri).predict(df)`` scores raw rows. The scoring names (``Scorer``, ``raw_text``,
``validate_rows``, ``BUILDERS``, ...) live in ``emm.tracking.scorer``, which imports no MLflow, and are
re-exported here.

Why the pyfunc is logged from code (``scorer_model.py``, MLflow's "models from code") and not as an
object: an object is cloudpickled into ``python_model.pkl``, and unpickling a model file runs whatever
code the file says. Logged from code, the model folder holds a readable Python file, JSON, Parquet and
safetensors, and nothing is pickled.

Why the input signature types every column as ``Any``: raw rows come as CSV strings, int64 (UCI's
``73``), float or numeric strings, and MLflow's typed enforcement refuses some of them (int64 -> double
"can not safely convert"). The signature still names every required column (MLflow checks they are
there); the values are checked where a bad one can be named, by ``validate_rows``, on every value's text
form (``raw_text``), so the same value scores the same whatever its dtype.

Why a frame with bad rows is refused whole: see ``emm.tracking.scorer``. The pyfunc raises ``InputRefused``,
which MLflow's scoring server answers with a 400 carrying that message and no traceback.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, ColSpec
from mlflow.types.schema import Schema as MlflowSchema

from emm.data.encoding import Encoder
from emm.data.schema import SCHEMA_FILE, VOCAB_FILE, Schema
from emm.errors import EMMError
from emm.tracking.scorer import (  # re-exported: the pyfunc's names, defined where emm predict reads them
    BUILDERS,
    BUNDLE,
    COMPACT_MODEL_BUILDER,
    SCORE_BATCH_ROWS,
    SHOWN_BAD_ROWS,
    Scorer,
    bad_rows_message,
    raw_text,
    refuse_repeated_columns,
    resolve_builder,
    validate_rows,
)

__all__ = ["BUILDERS", "BUNDLE", "COMPACT_MODEL_BUILDER", "PIP_REQUIREMENTS", "SCORER_CODE", "SCORE_BATCH_ROWS",
           "SHOWN_BAD_ROWS", "EMMScorer", "InputRefused", "Scorer", "bad_rows_message", "input_signature",
           "log_scorer", "raw_example", "raw_text", "refuse_repeated_columns", "resolve_builder", "validate_rows",
           "write_bundle"]

PIP_REQUIREMENTS = ["torch", "pandas", "pyarrow", "safetensors", "scikit-learn", "pydantic"]
# The models-from-code file MLflow copies into every logged model (it calls mlflow.models.set_model).
SCORER_CODE = Path(__file__).with_name("scorer_model.py")


class InputRefused(MlflowException, EMMError):
    """An ``EMMError`` about the input rows, as MLflow's scoring server answers a bad request: 400, this message.

    Why: the server answers any other exception with a generic 400 whose ``stack_trace`` holds the real
    message among the server's file paths; an ``MlflowException`` with INVALID_PARAMETER_VALUE is answered
    with its own message and no trace. Still an ``EMMError``: a Python caller of the pyfunc catches what
    ``Scorer`` raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


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
    schema.json and vocabulary.parquet; a fused model's tree members' native files beside its weights (the
    bundle scores without them, from the weights; they are what the model was made from, checked on load)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps({"builder": builder, "config": config, "outputs": outputs},
                                                  indent=2))
    shutil.copyfile(weights, folder / "weights.safetensors")
    for member in config.get("fused", {}).get("output_members", []):
        shutil.copyfile(Path(weights).parent / member["file"], folder / member["file"])
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
