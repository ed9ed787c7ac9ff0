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
    """Yield string chunks of a raw file, stopping at the first malformed row with a clear error.

    CSV is cut into blocks of whole lines here, not by pyarrow's streaming reader, so that every block's
    first line number is known exactly: pyarrow skips blank lines without counting them, and reports a
    bad byte only for a whole block, so its own numbers drift or point at the block start.
    """
    if spec.format == "parquet":
        yield from _iter_parquet(spec, path)
        return
    columns = _expected_columns(spec, path)
    rows = 0
    for block, first_line in _line_blocks(path, block_bytes, skip_header=spec.header):
        chunk = _parse_block(spec, path, columns, block, first_line)
        if chunk is not None:
            rows += len(chunk.frame)
            yield chunk
    if rows == 0:
        raise EMMError(f"{path}: the file has no data rows")


def _line_blocks(path: Path, block_bytes: int, *, skip_header: bool) -> Iterator[tuple[bytes, int]]:
    """The decompressed file as blocks of about ``block_bytes`` that end on a line end, each with its first line."""
    line, carry, header = 1, b"", skip_header
    try:
        stream = pa.input_stream(str(path), compression="detect")
    except (pa.ArrowInvalid, OSError) as exc:
        raise EMMError(f"{path}: cannot be opened ({exc})") from exc
    with stream:
        while True:
            try:
                data = stream.read(block_bytes)
            except (pa.ArrowInvalid, OSError, EOFError) as exc:
                raise EMMError(f"{path}, after line {line - 1}: cannot be read ({exc}); is it truncated"
                               f"{' or not really gzip' if path.suffix == '.gz' else ''}?") from exc
            block = carry + data
            if data:
                cut = block.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a block: keep reading
                    carry = block
                    continue
                block, carry = block[:cut], block[cut:]
            if header:
                end = block.find(b"\n")
                block = b"" if end < 0 else block[end + 1:]
                line, header = line + 1, False
            if block:
                yield block, line
                line += block.count(b"\n")
            if not data:
                return


def _row_lines(block: bytes, first_line: int) -> np.ndarray | None:
    """Each row's line number when the block holds blank lines (which are lines but no rows), else None."""
    if not (block.startswith((b"\n", b"\r\n")) or b"\n\n" in block or b"\n\r\n" in block):
        return None
    raw = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(raw == 10)
    if not block.endswith(b"\n"):
        ends = np.append(ends, len(block))
    starts = np.concatenate([[0], ends[:-1] + 1])
    length = ends - starts
    blank = (length == 0) | ((length == 1) & (raw[np.minimum(starts, len(raw) - 1)] == 13))
    return first_line + np.flatnonzero(~blank)


def _parse_block(spec: DatasetSpec, path: Path, columns: list[str], block: bytes, first_line: int) -> Chunk | None:
    bad: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(row)
        return "error"

    read_opts = pacsv.ReadOptions(use_threads=False, block_size=max(len(block), 1 << 16),
                                  column_names=columns, autogenerate_column_names=False)
    parse_opts = pacsv.ParseOptions(delimiter=spec.delimiter, invalid_row_handler=on_invalid)
    convert_opts = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns}, strings_can_be_null=False, quoted_strings_can_be_null=False
    )
    row_lines = _row_lines(block, first_line)
    last_line = first_line + max(block.count(b"\n") - 1, 0)
    span = f"lines {first_line}-{last_line}"
    try:
        table = pacsv.read_csv(pa.BufferReader(block), read_options=read_opts, parse_options=parse_opts,
                               convert_options=convert_opts)
    except pa.ArrowInvalid as exc:
        if bad:
            row = bad[0]
            where = span
            if row.number is not None:
                pos = row.number - 1
                line = first_line + pos if row_lines is None or pos >= len(row_lines) else int(row_lines[pos])
                where = f"line {line}"
            raise EMMError(f"{path}, {where}: expected {row.expected_columns} columns, found "
                           f"{row.actual_columns} (row starts {row.text[:80]!r})") from exc
        if not block.strip(b"\r\n"):  # only blank lines: no rows
            return None
        raise _utf8_error(path, block, first_line, columns, spec.delimiter) or EMMError(f"{path}, {span}: {exc}") \
            from exc
    if table.num_rows == 0:
        return None
    if row_lines is not None and len(row_lines) != table.num_rows:
        row_lines = None  # lines that are not '\n'-terminated (old Mac '\r'): numbers are best effort
    frame = pd.DataFrame({name: pc.utf8_trim_whitespace(table.column(i)).to_numpy()
                          for i, name in enumerate(table.column_names)})
    return Chunk(frame, first_line, row_lines)


def _utf8_error(path: Path, block: bytes, first_line: int, columns: list[str], delimiter: str) -> EMMError | None:
    """The first byte that is not UTF-8, with its true line (and column, when the line has no quotes)."""
    try:
        block.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = block.rfind(b"\n", 0, exc.start) + 1
        line = first_line + block.count(b"\n", 0, exc.start)
        before = block[start:exc.start]
        index = before.count(delimiter.encode())
        column = f", column {columns[index]!r}" if b'"' not in before and index < len(columns) else ""
        return EMMError(f"{path}, line {line}{column}: byte {block[exc.start:exc.start + 1]!r} is not valid "
                        f"UTF-8; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
    return None


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
