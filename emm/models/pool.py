"""The trained pool on disk: ``pool.json`` + one file per model (safetensors; a tree's native text file).

A network member is built-in (``spec`` is a ``ModelSpec``: rebuilt by ``build_model``) or imported from
outside (``spec`` is a ``PortableSpec``: its torch.fx graph as plain JSON, rebuilt by ``emm.models.portable``
with no code of its author's). Either way ``build_member`` gives a fresh ``nn.Module`` taking
``(sparse, dense)`` and returning logits ``[B, 1]``, so decomposition and the fused-model loader never
need to know where a member came from; ``source`` and ``origin`` record that. A tree member (``spec`` a
``LightGBMSpec``, built-in, or a ``TreeSpec``, from a file) is ``pool/<name>.txt`` / ``.json``, the
library's own file, scored as a ``TreeModel`` built from it (``load_tree_member``); it is never decomposed
(``is_tree_spec``) and joins the fused model at the output.

Nothing in ``pool/`` is trusted as it lies: ``read_pool`` checks every member's entry against itself and
against the signature recorded beside it (what pretrain made it from), its weights file against the
recorded sha256, and, when the caller has params, the signatures against the params' pool
(``check_pool``: the one check every stage that reads ``pool/`` goes through). A file swapped or edited, or
an entry edited by hand, is refused with the member and the field named, never loaded as another model.
Loading then checks the schema fingerprint: a model trained on other features or vocabularies must fail
loudly with the mismatch named, never produce numbers; and weights holding NaN/inf are refused
(``emm.weights``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from emm.data.schema import Schema, check_fingerprint
from emm.errors import EMMError
from emm.io import digest, first_difference, read_json, sha256_file
from emm.models.portable import build_portable
from emm.models.single_task import ModelSpec, SingleTaskModel, build_model
from emm.models.trees import LightGBMSpec, TreeModel, TreeSpec, is_tree_spec, load_tree
from emm.weights import load_module

POOL_FILE = "pool.json"
RERUN = "rerun `emm pretrain`"
OLDER = ("written by an older EMM, before pool.json recorded it: rerun `emm pretrain --resume` (members finished in "
         "pool-work/ are reused, pool/ is written again)")
EDITED = f"pool.json was changed after `emm pretrain` wrote it (by hand?), so it no longer says what it holds: {RERUN}"
IDENTITY = {"name", "task", "spec", "weights", "weights_sha256", "schema_fingerprint", "source", "origin"}


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
    spec: ModelSpec | PortableSpec | LightGBMSpec | TreeSpec
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
    source: Literal["builtin", "mlflow", "factory", "file"] = "builtin"
    origin: ExternalOrigin | None = None
    weights_sha256: str | None = None


def member_spec(config: dict[str, Any]) -> ModelSpec | PortableSpec | LightGBMSpec | TreeSpec:
    """A spec dict (pool.json, fused.json's ``pool_specs``) -> its typed form."""
    if config.get("kind") == "portable":
        return PortableSpec.model_validate(config)
    if config.get("kind") == "tree":
        return TreeSpec.model_validate(config)
    if config.get("arch") == "lightgbm":
        return LightGBMSpec.model_validate(config)
    return ModelSpec.model_validate(config)


def load_tree_member(entry: PoolEntry, pool_dir: Path, schema: Schema) -> TreeModel:
    """A tree member as a frozen ``TreeModel`` from its file in ``pool_dir``, the file's sha256 checked against
    pool.json's (``entry.weights_sha256``) as it is read. What the fused model's loader calls for each tree
    member (``is_tree_spec(entry.spec)``)."""
    check_fingerprint(entry.schema_fingerprint, schema, f"pool model {entry.name!r}")
    return load_tree(Path(pool_dir) / entry.weights, entry.spec.format, schema, entry.name,
                     sha256=entry.weights_sha256)


def build_member(spec: ModelSpec | PortableSpec, schema: Schema) -> nn.Module:
    """A fresh member (weights not loaded) that takes ``(sparse, dense)`` of ``schema`` -> logits [B, 1].
    Tree members are not built here: they are their file (``load_tree_member``)."""
    if is_tree_spec(spec):
        raise EMMError(f"pool model {spec.name!r} is a tree model: it is read from its file in pool/ "
                       "(emm.models.pool.load_tree_member), not built from its spec")
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


def read_pool(pool_dir: Path, expected: Mapping[str, dict] | None = None) -> list[PoolEntry]:
    """pool.json's members, each checked (``check_pool``) before anything is built from them.

    ``expected``: member name -> the signature the params' pool gives now
    (``emm.pipeline.pretrain.pool_signatures``); callers without params (experiments, tests) leave it out.
    """
    path = Path(pool_dir) / POOL_FILE
    raw = read_json(path)
    try:
        entries = [PoolEntry.model_validate(e) for e in raw["models"]]
    except Exception as exc:
        raise EMMError(f"{path} is not a valid pool file ({exc}); {RERUN}") from exc
    check_pool(path, entries, raw.get("signatures"), expected)
    return entries


def check_pool(pool_file: Path, entries: list[PoolEntry], signatures: Any,
               expected: Mapping[str, dict] | None = None) -> None:
    """Every member's entry against its own spec and its recorded signature (``check_entry``), its weights
    file against its recorded digest (``check_weights``), and, given ``expected``, the pool against the
    params' pool (``check_against_params``)."""
    if not isinstance(signatures, dict):
        raise EMMError(f"{pool_file} records no member signatures ({OLDER})")
    for entry in entries:
        check_entry(pool_file, entry, signatures.get(entry.name))
        check_weights(pool_file.parent, entry)
    if expected is not None:
        check_against_params(pool_file, entries, signatures, expected)


def check_entry(pool_file: Path, entry: PoolEntry, signature: dict | None) -> None:
    """One entry against its spec and against the signature pretrain recorded for it.

    Why: the entry's ``task`` decides which task a member scores and donates to, so an edited one made an
    income model fuse as a marital donor; the signature says what the member was made from.
    """
    member = f"{pool_file}: member {entry.name!r}"
    for field in ("name", "task"):
        if getattr(entry.spec, field) != getattr(entry, field):
            raise EMMError(f"{member} has {field} {getattr(entry, field)!r} but its spec has {field} "
                           f"{getattr(entry.spec, field)!r}; {EDITED}")
    if not isinstance(signature, dict):
        raise EMMError(f"{member} has no recorded signature ({OLDER})")
    recorded: dict[str, Any] = {"fingerprint": signature.get("fingerprint")}
    now: dict[str, Any] = {"fingerprint": entry.schema_fingerprint, "source": entry.source}
    if "spec" in signature:  # trained here: the signature holds the spec itself
        recorded.update(source="builtin", spec=signature["spec"])
        now["spec"] = entry.spec.model_dump(mode="json")
    else:  # imported: the signature holds the params entry it was imported from
        made_from = signature.get("member") or {}
        source = "mlflow" if "uri" in made_from else "file" if {"lightgbm", "xgboost"} & set(made_from) \
            else "factory"
        recorded.update(source=source, name=made_from.get("name"), task=made_from.get("task"))
        now.update(name=entry.name, task=entry.task)
    found = first_difference(now, recorded)
    if found:
        where, ours, theirs = found
        raise EMMError(f"{member}: {where} is {ours!r} in its entry but {theirs!r} in the signature recorded "
                       f"beside it; {EDITED}")


def check_weights(pool_dir: Path, entry: PoolEntry) -> None:
    """The member's weights file is the one pretrain wrote: its sha256 equals the recorded one."""
    path = Path(pool_dir) / entry.weights
    member = f"{Path(pool_dir) / POOL_FILE}: member {entry.name!r}"
    if entry.weights_sha256 is None:
        raise EMMError(f"{member} records no weights digest ({OLDER})")
    if not path.is_file():
        raise EMMError(f"{member}: its weights file {path} is missing; {RERUN}")
    sha = sha256_file(path)
    if sha != entry.weights_sha256:
        raise EMMError(f"{member}: its weights file {path} has sha256 {sha}, but pool.json records "
                       f"{entry.weights_sha256}: the file was replaced or changed after `emm pretrain` wrote it "
                       "(another member's file, a copy from elsewhere, an edit), and loading it would score another "
                       f"model under this name; {RERUN}")


def check_against_params(pool_file: Path, entries: list[PoolEntry], signatures: dict,
                         expected: Mapping[str, dict]) -> None:
    """The members, in order, and what each was made from, as the params' pool gives them now."""
    names = [e.name for e in entries]
    if names != list(expected):
        raise EMMError(f"{pool_file} holds members {names} but pretrain.pool gives {list(expected)} in params.yaml: "
                       f"pool/ was made from other settings; {RERUN}")
    for e in entries:
        found = first_difference(signatures[e.name], expected[e.name])
        if found and found[0] == "fingerprint":
            raise EMMError(f"{pool_file}: member {e.name!r} was trained on another data schema (fingerprint "
                           f"{found[1]!r}) than the ingested data's ({found[2]!r}); {RERUN}")
        if found:
            where, ours, theirs = found
            raise EMMError(f"{pool_file}: member {e.name!r} was made from other settings than params.yaml and the "
                           f"data give now: {where} is {ours!r} in {POOL_FILE} but {theirs!r} in pretrain.pool "
                           f"(with pretrain.train and the ingested data); {RERUN}")


def pool_digest(entries: list[PoolEntry]) -> str:
    """Which pool this is: each member's identity (name, task, spec, weights and their digest, schema,
    source), in pool order. Its scores and timings are left out: they describe a pool, they do not make it
    another one. Components and the fused model record it, so a stage can tell they came from this pool."""
    return digest([e.model_dump(mode="json", include=IDENTITY) for e in entries])


def load_pool(pool_dir: Path, schema: Schema,
              expected: Mapping[str, dict] | None = None) -> list[tuple[PoolEntry, nn.Module]]:
    """Every pool model rebuilt from its spec, weights loaded, in eval mode (a tree member read from its file:
    ``load_tree_member``); the pool checked first (``read_pool``), weights holding NaN/inf refused
    (``emm.weights.load_module``)."""
    out = []
    for entry in read_pool(pool_dir, expected):
        check_fingerprint(entry.schema_fingerprint, schema, f"pool model {entry.name!r}")
        if entry.task not in schema.task_names:
            raise EMMError(f"pool model {entry.name!r} is for task {entry.task!r}, which the data does not have "
                           f"(tasks: {schema.task_names})")
        if is_tree_spec(entry.spec):
            out.append((entry, load_tree_member(entry, pool_dir, schema)))
            continue
        model = build_member(entry.spec, schema)
        load_module(model, Path(pool_dir) / entry.weights, what=f"pool model {entry.name!r}", fix=RERUN)
        out.append((entry, model.eval()))
    return out
