"""Stage 7, ``predict``: batch scoring of raw rows (CSV or Parquet in the ingested layout) with a logged EMM model.

Rows that cannot be scored (a required value missing, a dense value that is not a number) are never
silently scored: they go to a rejects file with the reason, and the run reports how many there were.
A missing required *column* fails the whole run with the column names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from emm.errors import EMMError
from emm.io import atomic_file
from emm.pipeline.params import load_params
from emm.tracking.pyfunc import load_scorer


@dataclass
class PredictReport:
    scored: int
    rejected: int
    output: Path
    rejects: Path | None


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise EMMError(f"input file {path} does not exist")
    try:
        if path.suffix == ".parquet":
            frame = pq.read_table(path).to_pandas()
            return frame.astype(str).where(frame.notna(), "")
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise EMMError(f"input file {path} cannot be read as {'Parquet' if path.suffix == '.parquet' else 'CSV'}: "
                       f"{exc}") from exc


def required_columns(scorer) -> tuple[list[str], list[str]]:
    """(sparse, dense) input columns from the model's signature; all dense ones are numeric."""
    schema = scorer.metadata.get_input_schema()
    sparse = [c.name for c in schema.inputs if str(c.type) in ("DataType.string", "string")]
    dense = [c.name for c in schema.inputs if c.name not in sparse]
    return sparse, dense


def validate_rows(frame: pd.DataFrame, sparse: list[str], dense: list[str]) -> pd.Series:
    """A reason per row ('' = fine)."""
    missing_cols = [c for c in sparse + dense if c not in frame.columns]
    if missing_cols:
        raise EMMError(f"input lacks required column(s) {missing_cols}; the model needs {len(sparse + dense)} columns "
                       f"in the ingested layout")
    reasons = pd.Series("", index=frame.index, dtype=object)
    for col in sparse + dense:
        empty = frame[col].astype(str).str.strip().eq("")
        reasons[empty & reasons.eq("")] = f"missing value in {col!r}"
    for col in dense:
        numbers = pd.to_numeric(frame[col], errors="coerce")
        bad = ~np.isfinite(numbers.to_numpy(dtype=float)) & reasons.eq("")
        reasons[bad] = f"{col!r} is not a number"
    return reasons


def predict_file(scorer, input_path: Path, output_path: Path) -> PredictReport:
    frame = read_table(input_path)
    if frame.empty:
        raise EMMError(f"input file {input_path} has no rows")
    sparse, dense = required_columns(scorer)
    reasons = validate_rows(frame, sparse, dense)
    good = reasons.eq("")
    scores = scorer.predict(frame.loc[good, sparse + dense].assign(
        **{c: pd.to_numeric(frame.loc[good, c]) for c in dense}).reset_index(drop=True))
    scores.insert(0, "row", np.flatnonzero(good.to_numpy()) + 1)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output_path) as tmp:
        if output_path.suffix == ".parquet":
            scores.to_parquet(tmp, index=False)
        else:
            scores.to_csv(tmp, index=False)
    rejects = None
    if (~good).any():
        rejects = output_path.with_name(output_path.stem + ".rejected.csv")
        rej = frame.loc[~good].copy()
        rej.insert(0, "reason", reasons[~good])
        rej.insert(0, "row", np.flatnonzero((~good).to_numpy()) + 1)
        rej.to_csv(rejects, index=False)
    return PredictReport(scored=int(good.sum()), rejected=int((~good).sum()), output=output_path, rejects=rejects)


def predict_stage(model_uri: str, input_path: Path, output_path: Path,
                  params: Path | str | None = None) -> PredictReport:
    cfg = load_params(params)
    return predict_file(load_scorer(model_uri, cfg.tracking.store), input_path, output_path)
