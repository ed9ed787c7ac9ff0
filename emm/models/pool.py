"""The trained pool on disk: ``pool.json`` + one safetensors file per model.

A member is built-in (``spec`` is a ``ModelSpec``: rebuilt by ``build_model``) or imported from outside
(``spec`` is a ``PortableSpec``: its torch.fx graph as plain JSON, rebuilt by ``emm.models.portable``
with no code of its author's). Either way ``build_member`` gives a fresh ``nn.Module`` taking
``(sparse, dense)`` and returning logits ``[B, 1]``, so decomposition and the fused-model loader never
need to know where a member came from; ``source`` and ``origin`` record that.

Loading checks the schema fingerprint first: a model trained on other features or vocabularies must
fail loudly with the mismatch named, never produce numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from emm.data.schema import Schema, check_fingerprint
from emm.errors import EMMError
from emm.io import read_json
from emm.models.portable import build_portable
from emm.models.single_task import ModelSpec, SingleTaskModel, build_model
from emm.weights import load_module

POOL_FILE = "pool.json"


class PortableSpec(BaseModel):
    """An imported member's architecture: its portable graph (``emm.models.portable``), no code."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["portable"] = "portable"
    name: str
    task: str
    model_type: str = Field(description="the class of the model it was traced from")
    input_shapes: list[list[int]] = Field(description="per-row shapes of (sparse, dense) it was traced for")
    graph: dict[str, Any]


class ExternalOrigin(BaseModel):
    """Where an imported member came from, as pool.json and its MLflow run record it."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = None
    resolved_uri: str | None = Field(default=None, description="models:/NAME/VERSION an alias resolved to")
    run_id: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] | None = None
    weights_file: str | None = None
    source_sha256: str | None = Field(default=None, description="sha256 of the file the weights were read from")
    inputs: str = "tensors"
    output: str = "logit"
    encoding: Literal["recorded", "unrecorded"] = "unrecorded"
    trained_fingerprint: str | None = None
    trust_pickle: bool = False


class PoolEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    task: str
    spec: ModelSpec | PortableSpec
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
    source: Literal["builtin", "mlflow", "factory"] = "builtin"
    origin: ExternalOrigin | None = None
    weights_sha256: str | None = None


def member_spec(config: dict[str, Any]) -> ModelSpec | PortableSpec:
    """A spec dict (pool.json, fused.json's ``pool_specs``) -> its typed form."""
    if config.get("kind") == "portable":
        return PortableSpec.model_validate(config)
    return ModelSpec.model_validate(config)


def build_member(spec: ModelSpec | PortableSpec, schema: Schema) -> nn.Module:
    """A fresh member (weights not loaded) that takes ``(sparse, dense)`` of ``schema`` -> logits [B, 1]."""
    if isinstance(spec, ModelSpec):
        return build_model(spec, schema)
    if spec.input_shapes != [[schema.n_sparse], [schema.n_dense]]:
        raise EMMError(f"pool model {spec.name!r} was imported for inputs of per-row shapes {spec.input_shapes}, but "
                       f"{schema.dataset!r} has {schema.n_sparse} sparse and {schema.n_dense} dense features; import "
                       "it again on the current data (`emm pretrain`)")
    return build_portable(spec.graph)


def build_from_config(config: dict[str, Any], schema: Schema) -> SingleTaskModel:
    """The pyfunc builder: spec dict -> fresh model."""
    return build_model(ModelSpec.model_validate(config), schema)


def read_pool(pool_dir: Path) -> list[PoolEntry]:
    raw = read_json(Path(pool_dir) / POOL_FILE)
    try:
        return [PoolEntry.model_validate(e) for e in raw["models"]]
    except Exception as exc:
        raise EMMError(f"{Path(pool_dir) / POOL_FILE} is not a valid pool file ({exc}); rerun `emm pretrain`") from exc


def load_pool(pool_dir: Path, schema: Schema) -> list[tuple[PoolEntry, nn.Module]]:
    """Every pool model rebuilt from its spec, weights loaded, in eval mode."""
    out = []
    for entry in read_pool(pool_dir):
        check_fingerprint(entry.schema_fingerprint, schema, f"pool model {entry.name!r}")
        if entry.task not in schema.task_names:
            raise EMMError(f"pool model {entry.name!r} is for task {entry.task!r}, which the data does not have "
                           f"(tasks: {schema.task_names})")
        model = build_member(entry.spec, schema)
        load_module(model, Path(pool_dir) / entry.weights, what=f"pool model {entry.name!r}",
                    fix="run `emm pretrain` again")
        out.append((entry, model.eval()))
    return out
