"""The scorable model bundle: raw feature rows in, one probability column per task out.

A bundle is ``model.json`` (which builder, its JSON config, the output tasks), ``weights.safetensors``,
``schema.json`` and ``vocabulary.parquet``: the same encoder as ingestion maps raw values to indices
(unseen -> reserved 0), so ``mlflow.pyfunc.load_model(uri).predict(df)`` scores raw rows. The torch module is
rebuilt from its spec, never unpickled, and ``model.json`` may only name a builder from ``BUILDERS``.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import mlflow
import pandas as pd
import pyarrow.parquet as pq
from mlflow.models import infer_signature

from emm.data.encoding import Encoder
from emm.data.schema import SCHEMA_FILE, VOCAB_FILE, Schema
from emm.data.tensors import frame_to_tensors
from emm.errors import EMMError
from emm.train.trainer import predict_proba
from emm.weights import load_module
from emm.tracking.store import configure, tracking_uri

PIP_REQUIREMENTS = ["torch", "pandas", "pyarrow", "safetensors", "scikit-learn", "pydantic"]
# The only builders a bundle may name: a model file must not be able to make us import and call anything.
BUILDERS = ("emm.models.pool:build_from_config", "emm.fusion.saved:build_from_config")


def resolve_builder(name: str, where: Path | str) -> Callable[..., Any]:
    """The builder function ``name`` refers to, if it is one of ``BUILDERS``."""
    if name not in BUILDERS:
        raise EMMError(f"{where} names builder {name!r}, which is not one of EMM's model builders {list(BUILDERS)}; "
                       "refusing to import it. Log the model again with this version of EMM")
    module_name, fn_name = name.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


class EMMScorer(mlflow.pyfunc.PythonModel):
    """Raw feature rows -> one probability column per task, rebuilt from spec + safetensors."""

    def load_context(self, context) -> None:  # noqa: ANN001 - mlflow's type
        folder = Path(context.artifacts["bundle"])
        meta = json.loads((folder / "model.json").read_text())
        self.schema = Schema.load(folder)
        self.encoder = Encoder.load(folder, self.schema)
        builder = resolve_builder(meta["builder"], folder / "model.json")
        self.model = builder(meta["config"], self.schema)
        load_module(self.model, folder / "weights.safetensors", what="logged model", fix="log the model again")
        self.model.eval()
        self.outputs = meta["outputs"]

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:  # noqa: ANN001
        encoded = self.encoder.transform(model_input, source="model input", first_line=None)
        tensors = frame_to_tensors(encoded, self.schema, with_labels=False)
        probs = predict_proba(self.model, tensors)
        return pd.DataFrame(probs, columns=[f"score_{t}" for t in self.outputs])


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


def log_scorer(name: str, *, builder: str, config: dict[str, Any], outputs: list[str], weights: Path,
               data_dir: Path, input_example: pd.DataFrame, registered_name: str | None = None):
    """Log an EMMScorer pyfunc with signature and input example; optionally register a new version."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        write_bundle(bundle, builder=builder, config=config, outputs=outputs, weights=weights,
                     data_dir=data_dir)
        scorer = EMMScorer()
        scorer.load_context(type("Ctx", (), {"artifacts": {"bundle": str(bundle)}})())
        output_example = scorer.predict(None, input_example)
        info = mlflow.pyfunc.log_model(
            name=name, python_model=scorer, artifacts={"bundle": str(bundle)},
            signature=infer_signature(input_example, output_example), input_example=input_example,
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


def load_scorer(model_uri: str, store: Path):
    """An MLflow pyfunc by URI (models:/emm-<dataset>@champion, runs:/..., a path)."""
    configure(store)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise EMMError(f"cannot load model {model_uri!r} from {tracking_uri(store)}: {exc}") from exc
