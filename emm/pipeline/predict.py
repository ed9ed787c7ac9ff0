"""Stage 7, ``predict``: batch scoring of raw rows (CSV or Parquet) with a logged EMM model.

Input: the model's raw feature columns, by name (extra columns, such as labels, are ignored), in any
sensible dtype: CSV text, int64 / float Parquet columns, numeric strings. A CSV whose first row holds none
of those names but has as many fields as the dataset's declaration (``emm/data/builtin/*.yaml`` or
``datasets:`` in params.yaml) is read as a headerless raw file in the declaration's column order (the UCI
Census files are such files). Every value is scored from its text form, as ingestion read it, so the
same value gives the same score whatever its dtype (``emm.tracking.scorer.raw_text``).

Rows that cannot be scored (a required value missing, a dense value that is not a number: the pyfunc's
``Scorer.validate``) are never silently scored: they go to ``<output>.rejected.csv`` with the reason, and the
run reports how many there were; a run without rejects removes a rejects file an earlier run left. A
missing required *column*, or one given twice, fails the whole run with the column names.

The input is never written: an output, or its rejects file, that is the input file (by any name: a
symlink, a hard link, ``r2.rejected.csv`` scored into ``r2.csv``) is refused before anything is read.

Streaming: the input is read, scored and written ``chunk_rows`` rows at a time (Parquet by record batches
of its row groups, CSV by pandas' ``chunksize``), so memory follows the chunk size, not the file size; a
progress bar counts the rows (on a terminal). The output and the rejects are written to temporary
siblings as they grow and renamed into place only when the whole input is done: a run that fails midway
(a malformed line in the last chunk) leaves the previous output or none, never part of one. A file
scores the same chunked as in one piece: each row is encoded and scored on its own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from emm.data.spec import DatasetSpec, resolve_dataset
from emm.errors import EMMError
from emm.io import atomic_file
from emm.pipeline.params import load_params
from emm.tracking.loading import load_scorer
from emm.tracking.scorer import Scorer, raw_text, refuse_repeated_columns

# Rows read, scored and written at a time: what bounds memory, whatever the input size. Why not more: the model
# scores a chunk in one batch, and its activations grow with the batch (a fused model's dominate the peak);
# past this size a larger chunk saves no time (the per-chunk costs are per column, and already small).
CHUNK_ROWS = 16_384


@dataclass
class PredictReport:
    """What a run did: rows scored and rejected, where they went, and how the input was read."""

    scored: int
    rejected: int
    output: Path
    rejects: Path | None
    headerless: bool = False


class RawLayout(NamedTuple):
    """How the dataset's declaration says its raw files look: every column in file order, the delimiter."""

    columns: list[str]
    delimiter: str


def raw_layout(dataset: str, declarations: dict[str, DatasetSpec] | None = None) -> RawLayout | None:
    """The raw layout of the dataset a model was trained on, if its declaration lists the columns."""
    try:
        spec = resolve_dataset(dataset, declarations)
    except EMMError:  # a dataset made some other way (e.g. synthesized): no raw layout to map by
        return None
    return RawLayout(list(spec.columns), spec.delimiter) if spec.columns else None


def _first_row(path: Path, delimiter: str) -> list[str]:
    first = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False, skipinitialspace=True,
                        sep=delimiter)
    return [str(v).strip() for v in first.iloc[0]] if len(first) else []


class InputRows(NamedTuple):
    """The input as a stream of chunks, whether it was read as headerless, and its row count if known."""

    chunks: Iterator[pd.DataFrame]
    headerless: bool
    total: int | None


def read_chunks(path: Path, needed: list[str], layout: RawLayout | None = None,
                chunk_rows: int = CHUNK_ROWS) -> InputRows:
    """The input rows, ``chunk_rows`` at a time (Parquet in its own dtypes, CSV as text); a file that cannot
    be read, at its start or further down, is an ``EMMError`` naming it."""
    path = Path(path)
    if path.is_dir():  # refuse_unsafe_output says so first when predict_file calls this
        raise EMMError(f"input {path} is a folder; name the CSV or Parquet file to score")
    if not path.is_file():
        raise EMMError(f"input file {path} does not exist")
    if chunk_rows < 1:
        raise EMMError(f"chunk_rows must be a positive number of rows, got {chunk_rows}")
    kind = "Parquet" if path.suffix == ".parquet" else "CSV"
    failure = (ValueError, OSError, EOFError, pd.errors.ParserError, pa.ArrowException)  # EmptyDataError: ValueError

    def guarded(chunks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        try:
            yield from chunks
        except failure as exc:
            raise EMMError(f"input file {path} cannot be read as {kind}: {exc}") from exc

    try:
        if kind == "Parquet":
            parquet = pq.ParquetFile(path)
            refuse_repeated_columns(parquet.schema_arrow.names, needed, f"input file {path}", " in its schema",
                                    "columns")
            batches = (b.to_pandas() for b in parquet.iter_batches(batch_size=chunk_rows))
            return InputRows(guarded(batches), False, parquet.metadata.num_rows)
        headerless = False
        if layout is not None:  # headerless: the declared number of fields, none of them a column name
            first = _first_row(path, layout.delimiter)
            headerless = len(first) == len(layout.columns) and not set(first) & set(needed)
        options = dict(dtype=str, keep_default_na=False, skipinitialspace=True, chunksize=chunk_rows)
        if headerless:
            reader = pd.read_csv(path, header=None, names=layout.columns, sep=layout.delimiter, **options)
        else:  # the header as written: pandas would rename a second `age` to `age.1`
            refuse_repeated_columns(_first_row(path, ","), needed, f"input file {path}", " in the header", "fields")
            reader = pd.read_csv(path, **options)
    except failure as exc:
        raise EMMError(f"input file {path} cannot be read as {kind}: {exc}") from exc

    def csv_chunks() -> Iterator[pd.DataFrame]:
        with reader:
            yield from reader

    return InputRows(guarded(csv_chunks()), headerless, None)


def require_columns(frame: pd.DataFrame, needed: list[str], layout: RawLayout | None = None) -> None:
    """Fail the whole run, naming them, when required columns are missing (no row could be scored)."""
    missing_cols = [c for c in needed if c not in frame.columns]
    if missing_cols:
        raw = (f", or no header row and the {len(layout.columns)} columns of the dataset's declaration in order"
               if layout else "")
        raise EMMError(f"input lacks required column(s) {missing_cols}; the model needs {len(needed)} raw "
                       f"feature columns: a header row naming them (the ingested column names){raw}")


def annotated(rejected: pd.DataFrame, rows: np.ndarray, reasons: pd.Series) -> pd.DataFrame:
    """Rejected input rows behind this run's ``row`` and ``reason`` columns.

    An input column of either name (a rejects file, fixed, scored again) is kept, renamed ``input_row`` /
    ``input_reason``: the row number in the file it came from is how the user finds the row there."""
    taken, renames = set(rejected.columns), {}
    for name in ("row", "reason"):
        if name in taken:
            new = f"input_{name}"
            while new in taken:
                new = f"input_{new}"
            renames[name] = new
            taken.add(new)
    out = rejected.rename(columns=renames)
    out.insert(0, "reason", reasons.to_numpy())
    out.insert(0, "row", rows)
    return out


class TableWriter:
    """Appends frames to one CSV or Parquet file, the header or the schema from the first.

    ``path`` is where to write (an ``atomic_file`` temporary), ``final`` the file it becomes: its suffix
    picks the format."""

    def __init__(self, path: Path, final: Path, schema: pa.Schema | None = None) -> None:
        self.path, self.schema = Path(path), schema
        self.parquet = Path(final).suffix == ".parquet"
        self.rows = 0
        self.closed = False
        self._csv_started = False
        self._parquet: pq.ParquetWriter | None = None

    def write(self, frame: pd.DataFrame) -> None:
        if self.parquet:
            table = pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, table.schema)
            self._parquet.write_table(table)
        else:  # by path, appending: nothing stays open between chunks
            frame.to_csv(self.path, mode="a" if self._csv_started else "w", header=not self._csv_started, index=False)
            self._csv_started = True
        self.rows += len(frame)

    def close(self, empty: pd.DataFrame | None = None) -> None:
        """Finish the file (again: a no-op); one that got no frame is written from ``empty`` (columns, no rows)."""
        if self._parquet is None and not self._csv_started and empty is not None and not self.closed:
            self.write(empty)
        if self._parquet is not None:
            self._parquet.close()
        self._parquet = None
        self.closed = True


def rejects_path(output_path: Path) -> Path:
    """Where the rejected rows of a run writing ``output_path`` go: ``<stem>.rejected.csv`` beside it."""
    return Path(output_path).with_name(Path(output_path).stem + ".rejected.csv")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one existing file, by any name (symlink, hard link, ``..``)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: it cannot be the other
        return False


def refuse_unsafe_output(input_path: Path, output_path: Path) -> None:
    """An ``EMMError``, before anything is read or written, for an output the run would destroy or fail on.

    Why: the output and the rejects file are renamed into place at the end, and a run without rejects
    removes the rejects file: were either of them the input (``--output s.csv`` for ``--input s.csv``, or
    ``--input r2.rejected.csv --output r2.csv`` to score fixed rejects again), the input would be replaced
    or deleted. A folder in the output's place would fail only after the whole input was scored."""
    source, output = Path(input_path), Path(output_path)
    if source.is_dir():
        raise EMMError(f"input {source} is a folder; name the CSV or Parquet file to score")
    rejects = rejects_path(output)
    instead = source.with_name(f"{source.stem}-scores{output.suffix}")
    if _same_file(output, source):
        raise EMMError(f"--output {output} is the input file {source}: the scores would replace the rows; "
                       f"name another --output (e.g. {instead})")
    if _same_file(rejects, source):
        raise EMMError(f"the rejects file of --output {output} would be {rejects}, which is the input file: a run "
                       f"would overwrite it with its own rejects, or delete it when there are none; name another "
                       f"--output (e.g. {instead})")
    if output.is_dir():
        raise EMMError(f"--output {output} is a folder: name a file to write, e.g. {output / 'scores.csv'}")
    if rejects.is_dir():
        raise EMMError(f"the rejects file of --output {output} would be {rejects}, which is a folder: move it or "
                       "name another --output")
    folder = next((p for p in output.absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise EMMError(f"{folder} is a file, not a folder: --output {output} cannot be written under it")


def predict_file(scorer: Scorer, input_path: Path, output_path: Path,
                 declarations: dict[str, DatasetSpec] | None = None, *, chunk_rows: int = CHUNK_ROWS,
                 progress: bool | None = None) -> PredictReport:
    """Score ``input_path`` into ``output_path`` chunk by chunk (both files appear whole, at the end); rejects
    beside it, or none. ``progress``: a row counter on stderr (None: only on a terminal)."""
    refuse_unsafe_output(input_path, output_path)
    sparse, dense = scorer.sparse_columns, scorer.dense_columns
    layout = raw_layout(scorer.schema.dataset, declarations)
    rows = read_chunks(input_path, sparse + dense, layout, chunk_rows)
    output_path = Path(output_path)
    rejects = rejects_path(output_path)
    columns = ["row", *[f"score_{t}" for t in scorer.outputs]]
    schema = pa.schema([("row", pa.int64()), *[(c, pa.float32()) for c in columns[1:]]])
    no_scores = pd.DataFrame({c: pd.Series(dtype="int64" if c == "row" else "float32") for c in columns})
    seen = 0
    with contextlib.ExitStack() as stack:  # unwinds in reverse: writers closed, then the temporary files renamed
        scores_out = TableWriter(stack.enter_context(atomic_file(output_path)), output_path, schema)
        stack.callback(scores_out.close, no_scores)
        rejects_out: TableWriter | None = None
        bar = stack.enter_context(tqdm(total=rows.total, unit="rows", desc=f"scoring {Path(input_path).name}",
                                       disable=None if progress is None else not progress, mininterval=1.0))
        for frame in rows.chunks:
            if seen == 0:
                require_columns(frame, sparse + dense, layout)
            text = pd.DataFrame({c: raw_text(frame[c]) for c in sparse + dense}, copy=False)
            reasons = scorer.validate(text)  # the pyfunc's own check: both refuse the same rows
            good = reasons.eq("").to_numpy()
            if good.any():
                scores = scorer.score_text(text if good.all() else text.loc[good].reset_index(drop=True))
                scores.insert(0, "row", seen + np.flatnonzero(good) + 1)
                scores_out.write(scores)
            if not good.all():
                if rejects_out is None:  # opened at the first reject: a run without rejects writes none
                    rejects_out = TableWriter(stack.enter_context(atomic_file(rejects)), rejects)
                    stack.callback(rejects_out.close)
                rejects_out.write(annotated(frame.loc[~good], seen + np.flatnonzero(~good) + 1, reasons[~good]))
            seen += len(frame)
            bar.update(len(frame))
        if seen == 0:
            raise EMMError(f"input file {input_path} has no rows")
    if rejects_out is None:
        rejects.unlink(missing_ok=True)  # a stale one from an earlier run would pass for this run's rejects
    rejected = rejects_out.rows if rejects_out is not None else 0
    return PredictReport(scored=seen - rejected, rejected=rejected, output=output_path,
                         rejects=rejects if rejects_out is not None else None, headerless=rows.headerless)


def predict_stage(model_uri: str, input_path: Path, output_path: Path,
                  params: Path | str | None = None) -> PredictReport:
    refuse_unsafe_output(input_path, output_path)  # before the model is loaded, too: a refusal needs none
    cfg = load_params(params)
    return predict_file(load_scorer(model_uri, cfg.tracking.store), input_path, output_path, cfg.datasets)
