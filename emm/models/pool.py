"""The trained pool on disk: ``pool.json`` + one safetensors file per model.

Loading checks the schema fingerprint first: a model trained on other features or vocabularies must
fail loudly with the mismatch named, never produce numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from emm.data.schema import Schema, check_fingerprint
from emm.errors import EMMError
from emm.io import read_json
from emm.models.single_task import ModelSpec, SingleTaskModel, build_model
from emm.weights import load_module

POOL_FILE = "pool.json"


class PoolEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    task: str
    spec: ModelSpec
    weights: str
    schema_fingerprint: str
    params: int
    val_auc: float
    test_auc: float
    val_logloss: float
    test_logloss: float
    epochs_run: int
    best_epoch: int
    seconds: float
    mlflow_run_id: str | None = None


def build_from_config(config: dict[str, Any], schema: Schema) -> SingleTaskModel:
    """The pyfunc builder: spec dict -> fresh model."""
    return build_model(ModelSpec.model_validate(config), schema)


def read_pool(pool_dir: Path) -> list[PoolEntry]:
    raw = read_json(Path(pool_dir) / POOL_FILE)
    try:
        return [PoolEntry.model_validate(e) for e in raw["models"]]
    except Exception as exc:
        raise EMMError(f"{Path(pool_dir) / POOL_FILE} is not a valid pool file ({exc}); rerun `emm pretrain`") from exc


def load_pool(pool_dir: Path, schema: Schema) -> list[tuple[PoolEntry, SingleTaskModel]]:
    """Every pool model rebuilt from its spec, weights loaded, in eval mode."""
    out = []
    for entry in read_pool(pool_dir):
        check_fingerprint(entry.schema_fingerprint, schema, f"pool model {entry.name!r}")
        if entry.task not in schema.task_names:
            raise EMMError(f"pool model {entry.name!r} is for task {entry.task!r}, which the data does not have "
                           f"(tasks: {schema.task_names})")
        model = build_model(entry.spec, schema)
        load_module(model, Path(pool_dir) / entry.weights, what=f"pool model {entry.name!r}",
                    fix="run `emm pretrain` again")
        out.append((entry, model.eval()))
    return out
