"""The pretrain stage's tree half: a built-in LightGBM member trained, a LightGBM / XGBoost file or MLflow model
imported.

Both end as every member does: a work folder ``pool-work/<name>/`` holding ``entry.json`` (signature +
entry) and the member's file, here the library's native file (``weights.txt`` / ``weights.json``, copied to
``pool/<name>.txt`` / ``.json`` with its sha256 in pool.json), and val/test AUCs taken the way every
member's are (``pool_score.score``), on the ``TreeModel`` read from that very file, so the AUCs recorded
are those of what the fused model will run.

A built-in ``{arch: lightgbm}`` trains as EMM's LightGBM baseline does (``emm.train.lightgbm_row``: sparse
features as categorical, quantile buckets left out, early stopping on the task's labelled validation rows)
on the task's labelled train rows, seeded by ``pretrain.train.seed``. A file member is checked like a
factory member: the encoding record beside it (``save_encoding``), its feature names and count against the
schema, a forward pass on validation rows held against the library's own predictions. A ``uri:`` member whose
MLflow model is a LightGBM / XGBoost one (``emm.tracking.external_trees``) goes through the same checks on its
native text, its encoding taken from its run as for a PyTorch ``uri:`` member (``pool_import.load_member``), and
records the resolved URI and the downloaded file's sha256.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from emm.data.batches import encoding_path, read_encoding
from emm.data.labels import require_labelled
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.io import inside, read_json, remove_tree, sha256_file, write_json
from emm.models.external import UriMember, check_encoding
from emm.models.pool import ExternalOrigin, PoolEntry
from emm.models.trees import (
    TREE_SUFFIX,
    LightGBMSpec,
    TreeFileMember,
    TreeSpec,
    check_tree,
    is_tree_spec,
    load_tree,
    pin_tree_file,
)
from emm.pipeline.params import PretrainConfig
from emm.pipeline.pool_score import CHECK_ROWS, import_signature, score
from emm.tracker import NullTracker, Tracker
from emm.train import distributed as ddp
from emm.train.lightgbm_row import DEFAULT_PARAMS, lightgbm_features

if TYPE_CHECKING:
    from emm.tracking.external_trees import TreeArtifact

log = logging.getLogger(__name__)


def lightgbm_settings(spec: LightGBMSpec, cfg: PretrainConfig) -> dict[str, Any]:
    """The LightGBM parameters a built-in member trains with: the baseline's, the entry's, the pool's seed."""
    return {**DEFAULT_PARAMS, **spec.overrides(), "seed": cfg.train.seed, "metric": "auc"}


def lightgbm_signature(spec: LightGBMSpec, cfg: PretrainConfig, fingerprint: str) -> dict[str, Any]:
    """What a built-in tree's result was made from: its entry, the resolved LightGBM settings, the schema."""
    return {"spec": spec.model_dump(mode="json"), "lightgbm": lightgbm_settings(spec, cfg), "fingerprint": fingerprint}


def work_file(work: Path, fmt: str) -> Path:
    """A tree member's file in its work folder."""
    return Path(work) / f"weights{TREE_SUFFIX[fmt]}"


def member_work_file(work: Path, member: Any) -> Path:
    """A member's finished file in its work folder (``member``: a params entry or a ``PoolEntry``):
    ``weights.safetensors``, a tree's native ``weights.txt`` / ``weights.json``."""
    spec = member.spec if isinstance(member, PoolEntry) else member
    if is_tree_spec(spec) or isinstance(spec, TreeFileMember):
        return work_file(work, spec.format)
    if isinstance(spec, UriMember):  # what the URI holds is known once imported: the file it left
        found = [work_file(work, f) for f in TREE_SUFFIX if work_file(work, f).is_file()]
        if found and not (Path(work) / "weights.safetensors").is_file():
            return found[0]
    return Path(work) / "weights.safetensors"


def _reuse(work: Path, signature: dict, fmt: str, name: str) -> PoolEntry | None:
    done = read_json(work / "entry.json") if (work / "entry.json").is_file() else None
    if done is not None and done.get("signature") == signature and work_file(work, fmt).is_file():
        log.info("%s: already done, reusing %s", name, work)
        return PoolEntry.model_validate(done["entry"])
    return None


def train_lightgbm_member(spec: LightGBMSpec, data_dir: Path, work_dir: Path, cfg: PretrainConfig, *,
                          resume: bool = False, tracker: Tracker | None = None) -> PoolEntry:
    """Train one built-in LightGBM member into ``work_dir/<name>/`` (rank 0 trains and writes; every rank
    gets its entry). When resuming, a finished result with the same signature is reused."""
    return PoolEntry.model_validate(ddp.on_main(lambda: _train_lightgbm(
        spec, Path(data_dir), Path(work_dir), cfg, resume, tracker or NullTracker()).model_dump(mode="json")))


def _train_lightgbm(spec: LightGBMSpec, data_dir: Path, work_dir: Path, cfg: PretrainConfig, resume: bool,
                    tracker: Tracker) -> PoolEntry:
    import lightgbm as lgb

    schema = Schema.load(data_dir)
    work = work_dir / spec.name
    signature = lightgbm_signature(spec, cfg, schema.fingerprint())
    if resume and (done := _reuse(work, signature, "lightgbm", spec.name)) is not None:
        return done
    started = time.perf_counter()
    categorical, features = lightgbm_features(schema)
    what = f"pool model {spec.name!r}"
    rows = {}
    for split in ("train", "val"):
        frame = pq.read_table(data_dir / f"{split}.parquet", columns=[*features, spec.task]).to_pandas()
        labels = frame[spec.task].to_numpy(dtype=np.float64, na_value=np.nan)
        rows[split] = frame[require_labelled(labels, spec.task, split, what)]
    settings = lightgbm_settings(spec, cfg)
    cats = categorical if spec.categorical else []
    train = lgb.Dataset(rows["train"][features], rows["train"][spec.task], categorical_feature=cats,
                        free_raw_data=False)
    val = lgb.Dataset(rows["val"][features], rows["val"][spec.task], reference=train, categorical_feature=cats)
    history: dict[str, dict[str, list[float]]] = {}
    booster = lgb.train(settings, train, num_boost_round=spec.rounds, valid_sets=[val],
                        callbacks=[lgb.early_stopping(spec.early_stop, verbose=False), lgb.record_evaluation(history)])
    remove_tree(work, work_dir)  # a guard, though names are checked at parse time: never outside pool-work/
    inside(work, work_dir).mkdir(parents=True)
    path = work_file(work, "lightgbm")
    booster.save_model(str(path), num_iteration=booster.best_iteration)
    entry = _tree_entry(spec.name, spec.task, spec, path, "lightgbm", data_dir, schema, tracker,
                        source="builtin", origin=None, started=started,
                        rounds=(int(booster.best_iteration), len(history["valid_0"]["auc"])))
    tracker.log_params({"task": spec.task, "arch": "lightgbm", **settings, "rounds": spec.rounds,
                        "early_stop": spec.early_stop, "categorical": spec.categorical})
    write_json(work / "entry.json", {"signature": signature, "entry": entry.model_dump(mode="json")})
    return entry


def import_tree_member(member: TreeFileMember, data_dir: Path, work_dir: Path, *, tracker: Tracker | None = None,
                       resume: bool = False, write: bool = True) -> PoolEntry:
    """Import a LightGBM / XGBoost file into ``work_dir/<name>/`` after its checks (module docstring)."""
    tracker = tracker or NullTracker()
    started = time.perf_counter()
    schema = Schema.load(data_dir)
    member = pin_tree_file(member)
    work = Path(work_dir) / member.name
    signature = import_signature(member, schema.fingerprint())
    if resume and (done := _reuse(work, signature, member.format, member.name)) is not None:
        return done
    sidecar = encoding_path(member.path)
    record = read_encoding(sidecar) if sidecar.is_file() else None
    recorded = check_encoding(record, schema, member.name, f"no {sidecar}" if record is None else str(sidecar))
    origin = ExternalOrigin(weights_file=str(member.path), source_sha256=member.sha256,
                            encoding="recorded" if recorded else "unrecorded",
                            trained_fingerprint=record.get("fingerprint") if record else None)
    entry = _tree_entry(member.name, member.task, None, member.path, member.format, data_dir, schema, tracker,
                        source="file", origin=origin, started=started, rounds=(0, 0))
    if write:
        _keep(entry, member.path, member.sha256, work, work_dir, signature, member.format)
    log.info("%s (%s file, imported): test AUC %.5f (val %.5f)", member.name, member.format, entry.test_auc,
             entry.val_auc)
    return entry


def import_logged_tree(member: UriMember, tree: TreeArtifact, origin: ExternalOrigin, data_dir: Path,
                       work_dir: Path, *, tracker: Tracker | None = None, write: bool = True) -> PoolEntry:
    """Import a ``uri:`` member whose MLflow model is a LightGBM / XGBoost one (``tree``: its native text, the
    encoding already checked into ``origin``) into ``work_dir/<name>/``, with the checks of a tree file."""
    tracker = tracker or NullTracker()
    started = time.perf_counter()
    schema = Schema.load(data_dir)
    signature = import_signature(member, schema.fingerprint())
    with tempfile.TemporaryDirectory() as tmp:
        path = work_file(Path(tmp), tree.format)  # the suffix XGBoost's reader goes by
        path.write_text(tree.text, encoding="utf-8")
        sha = sha256_file(path)
        log.info("pool model %r: %s, from %s", member.name, tree.note, origin.resolved_uri)
        entry = _tree_entry(member.name, member.task, None, path, tree.format, data_dir, schema, tracker,
                            source="mlflow", origin=origin, started=started, rounds=(0, 0))
        if write:
            _keep(entry, path, sha, Path(work_dir) / member.name, work_dir, signature, tree.format)
    log.info("%s (%s from MLflow, imported): test AUC %.5f (val %.5f)", member.name, tree.format, entry.test_auc,
             entry.val_auc)
    return entry


def _keep(entry: PoolEntry, path: Path, sha: str, work: Path, work_dir: Path, signature: dict, fmt: str) -> None:
    """Write a checked tree member's work folder: its native file (the bytes that were checked) and entry.json.
    Only a member that passed every check gets one."""
    remove_tree(work, work_dir)  # a guard, though names are checked at parse time: never outside pool-work/
    inside(work, work_dir).mkdir(parents=True)
    copy = work_file(work, fmt)
    shutil.copyfile(path, copy)
    if {entry.weights_sha256, sha256_file(copy)} != {sha}:  # what was checked is what is kept
        raise EMMError(f"pool model {entry.name!r}: {path} changed while it was being imported; run `emm pretrain` "
                       "again")
    write_json(work / "entry.json", {"signature": signature, "entry": entry.model_dump(mode="json")})


def _tree_entry(name: str, task: str, spec: LightGBMSpec | None, path: Path, fmt: str, data_dir: Path,
                schema: Schema, tracker: Tracker, *, source: str, origin: ExternalOrigin | None,
                started: float, rounds: tuple[int, int]) -> PoolEntry:
    """Read the member back from ``path`` as the pool will, check it against its library on validation rows,
    score it, and log it; the entry records the file's sha256."""
    model = load_tree(path, fmt, schema, name)
    example = load_split(data_dir, "val", schema).head(CHECK_ROWS)
    check_tree(model, path, example.sparse, example.dense)
    val_m, test_m = (score(model, data_dir, split, schema, task, None, what=f"pool model {name!r}")
                     for split in ("val", "test"))
    leaves = model.leaves
    recorded = spec if spec is not None else TreeSpec(name=name, task=task, format=fmt, features=model.reads,
                                                      trees=model.n_trees, leaves=leaves)
    tracker.log_params({"task": task, "source": source, "format": fmt, "trees": model.n_trees, "leaves": leaves,
                        **({k: v for k, v in origin.model_dump(mode="json").items() if v is not None} if origin
                           else {})})
    tracker.log_metrics({"best_val_auc": val_m["auc"], "test_auc": test_m["auc"], "best_val_logloss": val_m["logloss"],
                         "test_logloss": test_m["logloss"]})
    tracker.log_artifact(Path(path), "model")
    return PoolEntry(name=name, task=task, spec=recorded, weights=f"{name}{TREE_SUFFIX[fmt]}",
                     schema_fingerprint=schema.fingerprint(), params=leaves, val_auc=val_m["auc"],
                     test_auc=test_m["auc"], val_logloss=val_m["logloss"], test_logloss=test_m["logloss"],
                     epochs_run=rounds[1], best_epoch=rounds[0], seconds=round(time.perf_counter() - started, 2),
                     mlflow_run_id=tracker.run_id, source=source, origin=origin, weights_sha256=sha256_file(path))

