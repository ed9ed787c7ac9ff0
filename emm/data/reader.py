"""Chunked, validating reader for raw CSV/Parquet tables.

Why pyarrow's streaming CSV reader: it parses in bounded-size blocks (the 85M-row Ali-CCP never sits in
memory whole), reads gzip transparently, and reports a malformed row with its line number, which is
what a user needs to fix a file. Every value is read as a string; typing happens in ingestion, where a
bad value can be reported with its file, line and column.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from emm.data.spec import DatasetSpec
from emm.errors import EMMError


@dataclass(frozen=True)
class Chunk:
    """A block of rows as strings; ``first_line`` is the file line number of its first row (1-based).

    ``row_lines`` holds every row's own line when blank lines lie between the rows (they are no rows but
    still lines, so ``first_line + position`` would point too early); None when the rows are consecutive.
    """

    frame: pd.DataFrame
    first_line: int
    row_lines: np.ndarray | None = None

    @property
    def lines(self) -> int | np.ndarray:
        """What the encoding functions take to name a row's line (see ``emm.data.encoding.Lines``)."""
        return self.first_line if self.row_lines is None else self.row_lines

    def line_of(self, position: int) -> int:
        return self.first_line + position if self.row_lines is None else int(self.row_lines[position])


def resolve_file(raw_dir: Path, candidates: str | list[str]) -> Path:
    """The first existing candidate (NAME or NAME.gz); a clear error listing what was looked for."""
    names = [candidates] if isinstance(candidates, str) else list(candidates)
    tried = []
    for name in names:
        for path in (raw_dir / name, raw_dir / f"{name}.gz"):
            tried.append(path)
            if path.is_file():
                if path.stat().st_size == 0:
                    raise EMMError(f"raw file {path} is empty (0 bytes): restore it (see `emm fetch-data --help`)")
                return path
    if not raw_dir.is_dir():
        raise EMMError(f"raw data folder {raw_dir} does not exist: fill it with `emm fetch-data` or pass --raw-dir")
    raise EMMError(f"raw file missing: looked for {', '.join(str(p) for p in tried)}")


def _expected_columns(spec: DatasetSpec, path: Path) -> list[str]:
    if spec.header:
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
                first = fh.readline().rstrip("\r\n")
        except (OSError, EOFError) as exc:
            raise EMMError(f"{path}: cannot be read ({exc}); is it truncated or not really gzip?") from exc
        if not first.strip():
            raise EMMError(f"{path}: the header line is empty (is the file empty?)")
        found = [c.strip() for c in first.split(spec.delimiter)]
        if spec.columns is not None and found != spec.columns:
            missing = [c for c in spec.columns if c not in found]
            extra = [c for c in found if c not in spec.columns]
            raise EMMError(f"{path}: header does not match the declaration of {spec.name!r}: "
                           f"missing {missing}, unexpected {extra}")
        return found
    assert spec.columns is not None
    return list(spec.columns)


def iter_chunks(spec: DatasetSpec, path: Path, block_bytes: int) -> Iterator[Chunk]:
    """Yield string chunks of a raw file, stopping at the first malformed row with a clear error."""
    if spec.format == "parquet":
        yield from _iter_parquet(spec, path)
        return
    columns = _expected_columns(spec, path)
    bad: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(row)
        return "error"

    read_opts = pacsv.ReadOptions(
        use_threads=False, block_size=block_bytes,
        column_names=None if spec.header else columns, autogenerate_column_names=False,
    )
    parse_opts = pacsv.ParseOptions(delimiter=spec.delimiter, invalid_row_handler=on_invalid)
    convert_opts = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, strings_can_be_null=False, quoted_strings_can_be_null=False
    )
    line = 2 if spec.header else 1
    rows = 0
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            reader = pacsv.open_csv(stream, read_options=read_opts, parse_options=parse_opts,
                                    convert_options=convert_opts)
            for batch in reader:
                if batch.num_rows == 0:
                    continue
                frame = pd.DataFrame({
                    name: pc.utf8_trim_whitespace(batch.column(i)).to_numpy(zero_copy_only=False)
                    for i, name in enumerate(batch.schema.names)
                })
                yield Chunk(frame, line)
                line += batch.num_rows
                rows += batch.num_rows
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        if bad:
            row = bad[0]
            where = f"line {row.number}" if row.number is not None else f"near line {line}"
            raise EMMError(f"{path}, {where}: expected {row.expected_columns} columns, found "
                           f"{row.actual_columns} (row starts {row.text[:80]!r})") from exc
        if isinstance(exc, (OSError, EOFError)) or "gzip" in str(exc).lower():
            raise EMMError(f"{path}: cannot be read ({exc}); is it truncated or not really gzip?") from exc
        if "Empty CSV file" in str(exc):
            raise EMMError(f"{path}: the file has no rows") from exc
        raise EMMError(f"{path}, near line {line}: {exc}") from exc
    if rows == 0:
        raise EMMError(f"{path}: the file has no data rows")


def _iter_parquet(spec: DatasetSpec, path: Path, batch_rows: int = 1_000_000) -> Iterator[Chunk]:
    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EMMError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = pfile.schema_arrow.names
    if spec.columns is not None and names != spec.columns:
        missing = [c for c in spec.columns if c not in names]
        extra = [c for c in names if c not in spec.columns]
        raise EMMError(f"{path}: columns do not match the declaration of {spec.name!r}: "
                       f"missing {missing}, unexpected {extra}")
    if pfile.metadata.num_rows == 0:
        raise EMMError(f"{path}: the file has no data rows")
    line = 1
    for batch in pfile.iter_batches(batch_size=batch_rows):
        frame = pd.DataFrame({
            name: pc.utf8_trim_whitespace(pc.cast(batch.column(i), pa.string())).to_numpy(zero_copy_only=False)
            for i, name in enumerate(batch.schema.names)
        })
        frame = frame.fillna("")
        yield Chunk(frame, line)
        line += batch.num_rows


def file_columns(spec: DatasetSpec, path: Path) -> list[str]:
    """Column names of a raw file as the reader will see them."""
    if spec.format == "parquet":
        return pq.ParquetFile(path).schema_arrow.names
    return _expected_columns(spec, path)
