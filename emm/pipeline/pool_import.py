"""The pretrain stage's import half: outside pool members are loaded, checked, scored, recorded -- never trained.

For each ``uri:`` or ``factory:`` entry of ``pretrain.pool.<dataset>`` (``emm.models.external``):
1. load it: the factory called and its weights loaded, or the MLflow model downloaded (``emm.tracking.external``);
2. check the encoding it was trained on (sidecar / MLflow record): another one is refused, none is warned about;
3. run it on validation rows the way EMM will (``check_member``): the call, the output shape, every
   feature's largest index against its embedding;
4. wrap it in ``ExternalAdapter`` (EMM's ``(sparse, dense) -> logits [B, 1]``) and trace that into its
   portable form (``emm.models.portable``: torch.fx graph as JSON + safetensors, no user code needed later);
5. score val and test AUC with the same metrics as built-in members, and write its work folder
   (``pool-work/<name>/``: entry.json, weights.safetensors) for the pool to be assembled from.
A registered built-in member (``uri:`` pointing at ``emm-<dataset>-<task>``) skips 3-4: it is rebuilt from
its spec; an MLflow LightGBM / XGBoost model leaves after 2 for ``pool_trees.import_logged_tree``, checked and
kept as a tree file is. Provenance (source URI or factory, resolved version, the source file's sha256, the encoding
check) goes into the entry and the member's MLflow run.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from emm.data.batches import encoding_path, read_encoding
from emm.data.options import ScaleConfig
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.io import inside, read_json, remove_tree, sha256_file, write_json
from emm.models.external import (
    ExternalAdapter,
    FactoryMember,
    UriMember,
    build_factory_model,
    check_encoding,
    check_member,
    pin_weights,
    source_of,
)
from emm.models.pool import ExternalOrigin, PoolEntry, PortableSpec
from emm.models.portable import make_portable
from emm.models.single_task import ModelSpec, build_model
from emm.pipeline.pool_score import CHECK_ROWS, import_signature, score, task_rows
from emm.pipeline.pool_trees import import_logged_tree
from emm.tracker import NullTracker, Tracker
from emm.weights import load_module, save_module

if TYPE_CHECKING:
    from emm.tracking.external_trees import TreeArtifact

log = logging.getLogger(__name__)
__all__ = ["CHECK_ROWS", "Loaded", "import_member", "import_signature", "load_member", "score", "task_rows"]


@dataclass
class Loaded:
    """An outside member, loaded: a torch module to adapt, (a registered built-in) a spec + weights file, or
    (an MLflow LightGBM / XGBoost model) a tree's native text."""

    origin: ExternalOrigin
    module: nn.Module | None = None
    spec: ModelSpec | None = None
    weights: Path | None = None
    tree: TreeArtifact | None = None


@contextlib.contextmanager
def load_member(member: FactoryMember | UriMember, schema: Schema, store: Path) -> Iterator[Loaded]:
    """Load an outside member (a factory entry already pinned) and check the encoding it was trained on
    (the files live until the block ends)."""
    if isinstance(member, FactoryMember):
        sidecar = encoding_path(member.weights)
        record = read_encoding(sidecar) if sidecar.is_file() else None
        recorded = check_encoding(record, schema, member.name, f"no {sidecar}" if record is None else str(sidecar))
        origin = ExternalOrigin(factory=member.factory, kwargs=member.kwargs, weights_file=str(member.weights),
                                source_sha256=member.weights_sha256, inputs=member.inputs, output=member.output,
                                encoding="recorded" if recorded else "unrecorded",
                                trained_fingerprint=record.get("fingerprint") if record else None)
        yield Loaded(origin, module=build_factory_model(member))
        return
    from emm.tracking.external import load_uri  # local: only uri entries need mlflow

    with load_uri(member.uri, member.name, store, trust_pickle=member.trust_pickle) as got:
        recorded = check_encoding(got.encoding, schema, member.name, got.encoding_where)
        origin = ExternalOrigin(uri=member.uri, resolved_uri=got.resolved_uri, run_id=got.run_id,
                                source_sha256=got.source_sha256, inputs=member.inputs, output=member.output,
                                encoding="recorded" if recorded else "unrecorded",
                                trained_fingerprint=(got.encoding or {}).get("fingerprint"),
                                trust_pickle=member.trust_pickle)
        if got.spec is not None:
            spec = ModelSpec.model_validate({**got.spec, "name": member.name})
            if spec.task != member.task:
                raise EMMError(f"pool model {member.name!r}: {got.resolved_uri} was trained for task {spec.task!r}, "
                               f"not {member.task!r}; fix `task:` or point `uri:` at a model of that task")
            yield Loaded(origin, spec=spec, weights=got.weights)
        else:
            yield Loaded(origin, module=got.module, tree=got.tree)


def import_member(member: FactoryMember | UriMember, data_dir: Path, work_dir: Path, *, store: Path,
                  tracker: Tracker | None = None, scale: ScaleConfig | None = None, resume: bool = False,
                  write: bool = True) -> PoolEntry:
    """Import one outside member into ``work_dir/<name>/``.

    When resuming, a factory member whose signature (entry, weights sha256, schema) matches its work folder is
    reused; a ``uri:`` member is imported again, since an alias may have moved since (a registry lookup and
    two passes over val/test are cheap next to training)."""
    tracker = tracker or NullTracker()
    started = time.perf_counter()
    schema = Schema.load(data_dir)
    work = Path(work_dir) / member.name
    if isinstance(member, FactoryMember):
        member = pin_weights(member)
    signature = import_signature(member, schema.fingerprint())
    if resume and isinstance(member, FactoryMember) and (work / "entry.json").is_file() \
            and read_json(work / "entry.json").get("signature") == signature:
        log.info("%s: already imported, reusing %s", member.name, work)
        return PoolEntry.model_validate(read_json(work / "entry.json")["entry"])
    example = load_split(data_dir, "val", schema).head(CHECK_ROWS)
    with load_member(member, schema, store) as loaded:
        if loaded.tree is not None:  # an MLflow LightGBM / XGBoost model: a tree member, checked as a tree file
            return import_logged_tree(member, loaded.tree, loaded.origin, data_dir, work_dir, tracker=tracker,
                                      write=write)
        if loaded.spec is not None:
            model: nn.Module = build_model(loaded.spec, schema)
            load_module(model, loaded.weights, what=f"pool model {member.name!r}", fix="register it again")
            spec: ModelSpec | PortableSpec = loaded.spec
        else:
            check_member(loaded.module, member, schema, example.sparse, example.dense)
            adapter = ExternalAdapter(loaded.module, schema, inputs=member.inputs, output=member.output).eval()
            batches = [(example.sparse, example.dense), (example.sparse[:5], example.dense[:5])]
            model, graph = make_portable(adapter, batches, name=member.name, class_name=type(loaded.module).__name__)
            spec = PortableSpec(name=member.name, task=member.task, model_type=type(loaded.module).__name__,
                                input_shapes=[[schema.n_sparse], [schema.n_dense]], graph=graph)
    val_m, test_m = (score(model, data_dir, split, schema, member.task, scale, what=f"pool model {member.name!r}")
                     for split in ("val", "test"))
    n_params = sum(p.numel() for p in model.parameters())
    entry = PoolEntry(name=member.name, task=member.task, spec=spec, weights=f"{member.name}.safetensors",
                      schema_fingerprint=schema.fingerprint(), params=n_params, val_auc=val_m["auc"],
                      test_auc=test_m["auc"], val_logloss=val_m["logloss"], test_logloss=test_m["logloss"],
                      epochs_run=0, best_epoch=0, seconds=round(time.perf_counter() - started, 2),
                      mlflow_run_id=tracker.run_id, source=source_of(member), origin=loaded.origin)
    tracker.log_params({"task": member.task, "source": entry.source, "params": n_params, "model_type":
                        getattr(spec, "model_type", "SingleTaskModel"),
                        **{k: v for k, v in loaded.origin.model_dump(mode="json").items() if v is not None}})
    tracker.log_metrics({"best_val_auc": val_m["auc"], "test_auc": test_m["auc"], "best_val_logloss": val_m["logloss"],
                         "test_logloss": test_m["logloss"]})
    if write:
        remove_tree(work, work_dir)  # a guard, though names are checked at parse time: never outside pool-work/
        inside(work, work_dir).mkdir(parents=True)
        save_module(model, work / "weights.safetensors")
        entry = entry.model_copy(update={"weights_sha256": sha256_file(work / "weights.safetensors")})
        write_json(work / "entry.json", {"signature": signature, "entry": entry.model_dump(mode="json")})
    log.info("%s (%s, imported): test AUC %.5f (val %.5f)", member.name, entry.source, test_m["auc"], val_m["auc"])
    return entry
