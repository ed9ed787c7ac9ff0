"""The data each benchmark task set trains on: its own ingestion, because a task's label column is never a
feature, so the 2-, 3- and 4-task Census runs see different feature sets."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

from emm.data.ingest import ingest
from emm.data.options import IngestConfig
from emm.data.reader import resolve_file
from emm.data.schema import Schema
from emm.data.spec import DatasetSpec
from emm.io import digest, read_json, write_json

log = logging.getLogger(__name__)
MARKER = "benchmark-data.json"


def task_set_key(tasks: list[str]) -> str:
    """Folder name of a task set: ``income+marital+sex``."""
    return "+".join(tasks)


def slice_raw(spec: DatasetSpec, raw_dir: Path, out_dir: Path, rows: int) -> Path:
    """The first ``rows`` data rows of every raw file (header kept), same names and compression.

    Why: quick profiles must run the real pipeline on real rows, only fewer of them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for names in spec.files.values():
        src = resolve_file(raw_dir, names)
        dst = out_dir / src.name
        opener_in = gzip.open if src.suffix == ".gz" else open
        opener_out = gzip.open if dst.suffix == ".gz" else open
        keep = rows + (1 if spec.header else 0)
        with opener_in(src, "rt") as fin, opener_out(dst, "wt") as fout:
            for i, line in enumerate(fin):
                if i >= keep:
                    break
                fout.write(line)
    return out_dir


def prepare_task_set(spec: DatasetSpec, raw_dir: Path, tasks: list[str], work: Path, cfg: IngestConfig,
                     raw_rows: int | None) -> Path:
    """Ingest ``tasks`` into ``work/<task set>/data`` (reused when the same inputs made it before)."""
    folder = Path(work) / task_set_key(tasks)
    data_dir = folder / "data"
    signature = {"dataset": spec.name, "tasks": tasks, "raw_rows": raw_rows, "raw_dir": str(Path(raw_dir).resolve()),
                 "ingest": digest(cfg)}
    marker = folder / MARKER
    if marker.exists() and (data_dir / "schema.json").exists() and read_json(marker) == signature:
        return data_dir
    source = slice_raw(spec, Path(raw_dir), folder / "raw-slice", raw_rows) if raw_rows else Path(raw_dir)
    schema: Schema = ingest(spec, source, data_dir, cfg, tasks)
    write_json(marker, signature)
    log.info("benchmark data %s: %s rows", task_set_key(tasks), schema.rows)
    return data_dir
