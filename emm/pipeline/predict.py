"""Stage 7, ``predict``: batch scoring of raw rows (CSV or Parquet) with a logged EMM model.

Input: the model's raw feature columns, by name (extra columns, such as labels, are ignored), in any
sensible dtype: CSV text, int64 / float Parquet columns, numeric strings. A CSV whose first row holds none
of those names but has as many fields as the dataset's declaration (``emm/data/builtin/*.yaml`` or
``datasets:`` in params.yaml) is read as a headerless raw file in the declaration's column order (the UCI
Census files are such files). Every value is scored from its text form, as ingestion read it, so the
same value gives the same score whatever its dtype (``emm.tracking.pyfunc.raw_text``).

Rows that cannot be scored (a required value missing, a dense value that is not a number) are never
silently scored: they go to ``<output>.rejected.csv`` with the reason, and the run reports how many there
were; a run without rejects removes a rejects file an earlier run left. A missing required *column*
fails the whole run with the column names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from emm.data.spec import DatasetSpec, resolve_dataset
from emm.errors import EMMError
from emm.io import atomic_file
from emm.pipeline.params import load_params
from emm.tracking.loading import load_scorer
from emm.tracking.pyfunc import Scorer, raw_text


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


def read_table(path: Path, needed: list[str], layout: RawLayout | None = None) -> tuple[pd.DataFrame, bool]:
    """The input rows (Parquet in its own dtypes, CSV as text) and whether it was read as headerless."""
    path = Path(path)
    if not path.is_file():
        raise EMMError(f"input file {path} does not exist")
    kind = "Parquet" if path.suffix == ".parquet" else "CSV"
    try:
        if kind == "Parquet":
            return pq.read_table(path).to_pandas(), False
        headerless = False
        if layout is not None:  # headerless: the declared number of fields, none of them a column name
            first = _first_row(path, layout.delimiter)
            headerless = len(first) == len(layout.columns) and not set(first) & set(needed)
        if headerless:
            frame = pd.read_csv(path, header=None, names=layout.columns, sep=layout.delimiter, dtype=str,
                                keep_default_na=False, skipinitialspace=True)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
        return frame, headerless
    except (ValueError, OSError, EOFError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise EMMError(f"input file {path} cannot be read as {kind}: {exc}") from exc


def require_columns(frame: pd.DataFrame, needed: list[str], layout: RawLayout | None = None) -> None:
    """Fail the whole run, naming them, when required columns are missing (no row could be scored)."""
    missing_cols = [c for c in needed if c not in frame.columns]
    if missing_cols:
        raw = (f", or no header row and the {len(layout.columns)} columns of the dataset's declaration in order"
               if layout else "")
        raise EMMError(f"input lacks required column(s) {missing_cols}; the model needs {len(needed)} raw "
                       f"feature columns: a header row naming them (the ingested column names){raw}")


def validate_rows(frame: pd.DataFrame, sparse: list[str], dense: list[str]) -> pd.Series:
    """A reason per row ('' = fine); ``frame`` holds the input columns as text (``raw_text``)."""
    reasons = pd.Series("", index=frame.index, dtype=object)
    for col in sparse + dense:
        empty = frame[col].eq("")
        reasons[empty & reasons.eq("")] = f"missing value in {col!r}"
    for col in dense:
        numbers = pd.to_numeric(frame[col], errors="coerce")
        bad = ~np.isfinite(numbers.to_numpy(dtype=float)) & reasons.eq("")
        reasons[bad] = f"{col!r} is not a number"
    return reasons


def _write_table(frame: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        if path.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)


def rejects_path(output_path: Path) -> Path:
    return Path(output_path).with_name(Path(output_path).stem + ".rejected.csv")


def predict_file(scorer: Scorer, input_path: Path, output_path: Path,
                 declarations: dict[str, DatasetSpec] | None = None) -> PredictReport:
    """Score ``input_path`` into ``output_path`` (written atomically); rejects beside it, or none."""
    sparse, dense = scorer.sparse_columns, scorer.dense_columns
    layout = raw_layout(scorer.schema.dataset, declarations)
    frame, headerless = read_table(input_path, sparse + dense, layout)
    if frame.empty:
        raise EMMError(f"input file {input_path} has no rows")
    require_columns(frame, sparse + dense, layout)
    text = pd.DataFrame({c: raw_text(frame[c]) for c in sparse + dense})
    reasons = validate_rows(text, sparse, dense)
    good = reasons.eq("")
    scores = scorer.predict(text.loc[good])
    scores.insert(0, "row", np.flatnonzero(good.to_numpy()) + 1)
    output_path = Path(output_path)
    _write_table(scores, output_path)
    rejects = rejects_path(output_path)
    if (~good).any():
        rej = frame.loc[~good].copy()
        rej.insert(0, "reason", reasons[~good])
        rej.insert(0, "row", np.flatnonzero((~good).to_numpy()) + 1)
        _write_table(rej, rejects)
    else:
        rejects.unlink(missing_ok=True)  # a stale one from an earlier run would pass for this run's rejects
        rejects = None
    return PredictReport(scored=int(good.sum()), rejected=int((~good).sum()), output=output_path, rejects=rejects,
                         headerless=headerless)


def predict_stage(model_uri: str, input_path: Path, output_path: Path,
                  params: Path | str | None = None) -> PredictReport:
    cfg = load_params(params)
    return predict_file(load_scorer(model_uri, cfg.tracking.store), input_path, output_path, cfg.datasets)
