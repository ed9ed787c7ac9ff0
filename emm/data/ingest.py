"""Stage 1, ``ingest``: raw CSV/Parquet -> ``train|val|test.parquet`` + ``schema.json`` + ``vocabulary.parquet``.

Two streamed passes over the raw files, so memory stays bounded whatever the file size:
1. *fit*: validate the ``fit_on`` files and learn vocabularies and min-max ranges;
2. *write*: validate every file again, encode it chunk by chunk, carve val/test where the declaration
   says so, and append to the Parquet outputs inside a temporary folder that replaces the output folder
   only at the very end (a bad row anywhere means nothing is written).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from emm.data.encoding import Encoder, Lines, encode_labels, parse_dense
from emm.data.labels import keep_mask, unlabelled_message
from emm.data.options import IngestConfig
from emm.data.reader import Chunk, file_columns, iter_chunks, resolve_file
from emm.data.schema import VOCAB_FILE, DenseFeature, RawFile, Schema, SparseFeature, TaskInfo, vocab_digest
from emm.data.spec import SPLITS, DatasetSpec, TaskSpec
from emm.errors import EMMError
from emm.io import atomic_dir, digest, provenance, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturePlan:
    """Which raw columns become which inputs, after the leakage checks."""

    sparse: list[str]
    dense: list[str]
    tasks: dict[str, TaskSpec]


def plan_features(spec: DatasetSpec, tasks: dict[str, TaskSpec], columns: list[str], source: Path) -> FeaturePlan:
    """Resolve ``sparse: rest`` and refuse any declaration that would feed a label to the model."""
    label_cols = {t.column: name for name, t in tasks.items()}
    missing_labels = [c for c in label_cols if c not in columns]
    declared = list(spec.dense) + ([] if spec.sparse == "rest" else list(spec.sparse)) + list(spec.drop)
    missing = missing_labels + [c for c in declared if c not in columns]
    if missing:
        raise EMMError(f"{source}: declared column(s) {missing} are not in the file (it has {columns})")
    if spec.sparse == "rest":
        used = set(spec.dense) | set(spec.drop) | set(label_cols)
        sparse = [c for c in columns if c not in used]
    else:
        sparse = list(spec.sparse)
    for col in sparse + list(spec.dense):
        if col in label_cols:
            raise EMMError(
                f"dataset {spec.name!r}: column {col!r} is the label of task {label_cols[col]!r} and is also "
                f"declared as a feature; a task's label must never be a feature (it makes the task trivial). "
                f"Remove it from dense/sparse in the declaration."
            )
    clash = sorted(set(tasks) & (set(sparse) | set(spec.dense)))
    if clash:
        raise EMMError(f"dataset {spec.name!r}: task name(s) {clash} equal feature column names; the Parquet splits "
                       f"hold labels under the task names, so rename the task(s)")
    overlap = set(sparse) & set(spec.dense)
    if overlap:
        raise EMMError(f"dataset {spec.name!r}: column(s) {sorted(overlap)} are declared both dense and sparse")
    if spec.dense_buckets:
        taken = sorted({Encoder.bucket_name(c) for c in spec.dense} & set(columns))
        if taken:
            raise EMMError(f"dataset {spec.name!r}: dense_buckets would add feature(s) {taken}, but the file already "
                           f"has column(s) of that name; rename them or set dense_buckets: 0")
    if not sparse and not spec.dense:
        raise EMMError(f"dataset {spec.name!r}: no feature columns left after removing labels and drops")
    return FeaturePlan(sparse=sparse, dense=list(spec.dense), tasks=tasks)


def audit_leakage(frame: pd.DataFrame, labels: dict[str, np.ndarray], plan: FeaturePlan,
                  cfg: IngestConfig, source: Path, *, lines: Lines = None, missing: str = "error") -> None:
    """Refuse a feature that predicts a task (almost) perfectly on its own: a label left among features.

    Runs on the first chunk of the training file. Sparse features are scored by their per-category
    label rate, skipping ID-like ones (many categories, where that rate overfits by construction).
    Dense values are parsed exactly as the encoder parses them (``lines``, ``missing``), so a bad value
    gets the same file/line/column message here as anywhere else, never a traceback from the AUC.
    Each task is audited on its labelled rows (NaN labels: ``TaskSpec.missing_values``).
    """
    dense: dict[str, np.ndarray] = {}
    for task, y_all in labels.items():
        labelled = ~np.isnan(y_all)
        y = y_all[labelled]
        n = len(y)
        pos = int(y.sum())
        if min(pos, n - pos) < cfg.leakage_min_class_rows:
            continue
        for col in plan.dense:
            if col not in dense:
                dense[col] = parse_dense(frame[col], col, source=str(source), first_line=lines, missing=missing)
            auc = roc_auc_score(y, dense[col][labelled])
            _refuse_if_leaky(max(auc, 1 - auc), col, task, cfg, source, n)
        for col in plan.sparse:
            values = frame[col].to_numpy()[labelled]
            if pd.Series(values).nunique() > 0.05 * n:
                continue
            rate = pd.Series(y).groupby(values).transform("mean").to_numpy()
            _refuse_if_leaky(roc_auc_score(y, rate), col, task, cfg, source, n)


def _refuse_if_leaky(auc: float, col: str, task: str, cfg: IngestConfig, source: Path, n: int) -> None:
    if auc >= cfg.leakage_auc:
        raise EMMError(
            f"{source}: feature {col!r} alone predicts task {task!r} with AUC {auc:.4f} on the first {n} "
            f"labelled rows; "
            f"it is almost certainly a label (or derived from one) left among the features. Remove it from "
            f"the declaration, or raise ingest.leakage_auc if this is intended."
        )


class _StratifiedCarver:
    """Assigns rows to the carved split so that each stratum gets round(n * fraction) rows overall.

    Works chunk by chunk (bounded memory) and still hits the exact global count per stratum.
    """

    def __init__(self, fraction: float, seed: int) -> None:
        self.fraction = fraction
        self.rng = np.random.default_rng(seed)
        self.seen: dict[int, int] = defaultdict(int)
        self.taken: dict[int, int] = defaultdict(int)

    def assign(self, strata: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(strata), dtype=bool)
        for value in np.unique(strata):
            idx = np.flatnonzero(strata == value)
            self.seen[value] += len(idx)
            target = math.floor(self.seen[value] * self.fraction + 0.5) - self.taken[value]
            chosen = self.rng.permutation(len(idx))[:target]
            mask[idx[chosen]] = True
            self.taken[value] += target
        return mask


class _SplitWriters:
    """One Parquet writer per split, opened lazily, with row, labelled-row and positive counts.

    Labels arrive as float32 (NaN = no label) and are written as nullable int8 columns, built explicitly so
    that every chunk has the same Arrow schema whether or not it holds a null. ``label_fraction`` (train and
    val only) drops labels by ``keep_mask`` on the row index within the split as written, so the kept rows
    do not depend on chunking or on how the carve interleaves the splits.
    """

    def __init__(self, folder: Path, task_names: list[str], label_fraction: dict[str, float] | None = None,
                 seed: int = 0) -> None:
        self.folder = folder
        self.task_names = task_names
        self.label_fraction = dict(label_fraction or {})
        self.seed = seed
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.rows: dict[str, int] = defaultdict(int)
        self.positives: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.labelled: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def write(self, split: str, features: pd.DataFrame, labels: dict[str, np.ndarray]) -> None:
        n = len(features)
        if n == 0:
            return
        table = pa.Table.from_pandas(features, preserve_index=False)
        for t in self.task_names:
            y = labels[t]
            has = ~np.isnan(y)
            if t in self.label_fraction and split in FRACTION_SPLITS:
                has &= keep_mask(self.rows[split], n, self.label_fraction[t], seed=self.seed, task=t, split=split)
            values = np.where(has, y, 0).astype(np.int8)
            table = table.append_column(pa.field(t, pa.int8()), pa.array(values, mask=~has, type=pa.int8()))
            self.labelled[split][t] += int(has.sum())
            self.positives[split][t] += int(values[has].sum())
        if split not in self.writers:
            self.writers[split] = pq.ParquetWriter(self.folder / f"{split}.parquet", table.schema)
        self.writers[split].write_table(table)
        self.rows[split] += n

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


FRACTION_SPLITS = ("train", "val")  # label_fraction thins these; test keeps every label (scored on all of them)


def effective_fractions(spec: DatasetSpec, tasks: list[str], label_fraction: dict[str, float]) -> dict[str, float]:
    """``ingest.label_fraction`` checked against the tasks being built; fractions of 1 dropped (no effect).

    Why refuse an unknown task: a typo would otherwise silently train on every label, and the scarce-task
    result would be about the wrong setting.
    """
    unknown = [t for t in label_fraction if t not in tasks]
    if unknown:
        raise EMMError(f"ingest.label_fraction names task(s) {unknown} that dataset {spec.name!r} does not build "
                       f"(its tasks here: {tasks}); fix the task name(s) in params.yaml")
    return {t: float(f) for t, f in label_fraction.items() if f < 1}


def ingest(spec: DatasetSpec, raw_dir: Path, out_dir: Path, cfg: IngestConfig,
           tasks: list[str] | None = None) -> Schema:
    """Ingest one declared dataset. Returns the written schema; raises EMMError on any bad input."""
    started = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    selected = spec.select_tasks(tasks or cfg.tasks.get(spec.name))
    paths = {key: resolve_file(raw_dir, names) for key, names in spec.files.items()}
    columns = file_columns(spec, paths["train"])
    plan = plan_features(spec, selected, columns, paths["train"])
    for key, path in paths.items():
        if key != "train" and (other := file_columns(spec, path)) != columns:
            raise EMMError(f"{path}: its columns differ from {paths['train'].name}'s: missing "
                           f"{[c for c in columns if c not in other]}, unexpected {[c for c in other if c not in columns]}")
    block = cfg.block_mb << 20
    fractions = effective_fractions(spec, list(plan.tasks), cfg.label_fraction)

    encoder = Encoder(sparse=plan.sparse, dense=plan.dense,
                      bucketed=plan.dense if spec.dense_buckets else [], n_buckets=spec.dense_buckets)
    audited = False
    for key in spec.fit_on:
        for chunk in iter_chunks(spec, paths[key], block):
            encoder.partial_fit(chunk.frame, source=str(paths[key]), first_line=chunk.lines,
                                missing=spec.dense_missing)
            if key == "train" and not audited:
                labels = _labels(chunk, plan, paths[key])
                audit_leakage(chunk.frame, labels, plan, cfg, paths[key], lines=chunk.lines,
                              missing=spec.dense_missing)
                audited = True
    encoder.finish()

    raw_files: list[RawFile] = []
    with atomic_dir(out_dir) as tmp:
        writers = _SplitWriters(tmp, list(plan.tasks), fractions, cfg.seed)
        try:
            for key, path in paths.items():
                rows = _write_file(spec, key, path, plan, encoder, writers, cfg, block)
                raw_files.append(RawFile(key=key, path=path.name, sha256=sha256_file(path),
                                         bytes=path.stat().st_size, rows=rows))
        finally:
            writers.close()
        empty = [s for s in SPLITS if writers.rows.get(s, 0) == 0]
        if empty:
            raise EMMError(f"dataset {spec.name!r}: split(s) {empty} came out empty; the raw files are too small "
                           f"for the declared carve")
        _check_both_classes(spec, plan, writers)
        encoder.save_vocabulary(tmp / VOCAB_FILE)
        schema = _build_schema(spec, plan, encoder, writers, raw_files, cfg, fractions)
        schema.save(tmp)
    log.info("ingested %s in %.1fs: %s", spec.name, time.perf_counter() - started, dict(schema.rows))
    return schema


def _check_both_classes(spec: DatasetSpec, plan: FeaturePlan, writers: _SplitWriters) -> None:
    """Refuse a task that has no labelled row, or only one class among its labelled rows, in some split.

    Why here: such a split has no defined AUC, so training (early stopping on val AUC), model selection and
    evaluation would fail or silently skip the task much later, after hours of work on data that was
    unusable from the start.
    """
    for name, task in plan.tasks.items():
        labelled = {s: writers.labelled[s][name] for s in SPLITS}
        for split in SPLITS:
            if labelled[split] == 0:
                raise EMMError(f"dataset {spec.name!r}: " + unlabelled_message(
                    name, split, f"{writers.rows[split]} rows, labelled per split {labelled}", 0, 0))
        counts = {"positive": {s: writers.positives[s][name] for s in SPLITS},
                  "negative": {s: labelled[s] - writers.positives[s][name] for s in SPLITS}}
        for kind, per_split in counts.items():
            missing = [s for s in SPLITS if per_split[s] == 0]
            if not missing:
                continue
            rule = (f"{task.column} > {task.threshold}" if task.threshold is not None
                    else f"{task.column} in {task.positive_values}")
            hint = ""
            if spec.carve and set(missing) & set(spec.carve.into) and spec.carve.stratify != name:
                hint = f", carve stratified by this task (carve.stratify: {name})"
            if any(labelled[s] < writers.rows[s] for s in missing):
                hint += ", a larger ingest.label_fraction for it"
            raise EMMError(
                f"dataset {spec.name!r}: task {name!r} has no {kind} rows in split(s) {missing} "
                f"(labelled rows: {[labelled[s] for s in missing]}; label = 1 where {rule}), so its AUC is undefined "
                f"there and training would fail later. Check the task's positive_values/threshold in the "
                f"declaration, or give it more rows (larger raw files{hint}), or leave the task out "
                f"(ingest.tasks in params.yaml)."
            )


def _labels(chunk: Chunk, plan: FeaturePlan, path: Path) -> dict[str, np.ndarray]:
    return {name: encode_labels(chunk.frame[t.column], t, source=str(path), first_line=chunk.lines, name=name)
            for name, t in plan.tasks.items()}


def _write_file(spec: DatasetSpec, key: str, path: Path, plan: FeaturePlan, encoder: Encoder,
                writers: _SplitWriters, cfg: IngestConfig, block: int) -> int:
    carve = spec.carve if spec.carve and spec.carve.source == key else None
    carver = _StratifiedCarver(carve.fraction, cfg.seed) if carve else None
    rows = 0
    for chunk in iter_chunks(spec, path, block):
        encoded = encoder.transform(chunk.frame, source=str(path), first_line=chunk.lines,
                                    missing=spec.dense_missing)
        labels = _labels(chunk, plan, path)
        rows += len(encoded)
        if carver is None:
            writers.write(key, encoded, labels)
            continue
        if carve.stratify:  # rows without the stratifying task's label form a stratum of their own
            y = labels[carve.stratify]
            strata = np.where(np.isnan(y), -1, y).astype(np.int8)
        else:
            strata = np.zeros(len(encoded), dtype=np.int8)
        mask = carver.assign(strata)
        for split, rows_of in ((carve.into[0], mask), (carve.into[1], ~mask)):
            writers.write(split, encoded[rows_of].reset_index(drop=True),
                          {name: y[rows_of] for name, y in labels.items()})
    return rows


def _build_schema(spec: DatasetSpec, plan: FeaturePlan, encoder: Encoder, writers: _SplitWriters,
                  raw_files: list[RawFile], cfg: IngestConfig, fractions: dict[str, float]) -> Schema:
    offset = 0
    sparse = []
    sources = {encoder.bucket_name(c): c for c in encoder.bucketed}
    for col in encoder.sparse_features:
        size = len(encoder.vocab[col]) + 1
        source = sources.get(col)
        sparse.append(SparseFeature(name=col, vocab_size=size, offset=offset, bucket_of=source,
                                    edges=encoder.edges[source] if source else None,
                                    values_sha256=vocab_digest(encoder.vocab[col])))
        offset += size
    dense = [DenseFeature(name=c, min=encoder.minimum[c], max=encoder.maximum[c]) for c in plan.dense]
    tasks = []
    for name, t in plan.tasks.items():
        pos = {s: writers.positives[s][name] for s in SPLITS}
        labelled = {s: writers.labelled[s][name] for s in SPLITS}
        tasks.append(TaskInfo(
            name=name, column=t.column,
            rule=t.model_dump(exclude={"description"}, exclude_none=True),
            positives=pos, positive_rate={s: pos[s] / labelled[s] for s in SPLITS}, labelled=labelled,
        ))
    data_hash = hashlib.sha256("".join(sorted(f.sha256 for f in raw_files)).encode()).hexdigest()[:16]
    return Schema(
        dataset=spec.name, sparse=sparse, dense=dense, tasks=tasks,
        rows={s: writers.rows[s] for s in SPLITS}, raw_files=raw_files,
        encoding={
            "sparse": "label-encoded; index 0 of every feature is reserved for values unseen at fit time",
            "dense": "min-max scaled to [0, 1] with the fit ranges; values outside are clipped",
            "dense_buckets": (f"every dense column is also a sparse feature <column>_bucket: its bin among "
                              f"{spec.dense_buckets} quantile bins of the fit files (fewer where values repeat)"
                              if spec.dense_buckets else "off"),
            "fit_on": list(spec.fit_on),
            "note": ("vocabularies and ranges are fitted on the files " + "+".join(spec.fit_on)
                     + (" (the paper's protocol: it label-encodes on train+test)" if "test" in spec.fit_on else "")),
            "carve": spec.carve.model_dump() if spec.carve else None,
            "seed": cfg.seed,
            "label_fraction": fractions,
        },
        provenance=provenance(digest(cfg), data_hash),
    )
