"""Integer category codes written as floats (37.0 for 37) get the index of the integer code, not 'unseen'."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from emm.data.options import IngestConfig
from emm.data.encoding import Encoder
from emm.data.ingest import ingest
from emm.data.schema import Schema
from emm.data.spec import DatasetSpec, resolve_dataset

CENSUS = resolve_dataset("census-income")
CODES = ["det_ind_code", "det_occ_code", "own_or_self", "vet_benefits", "year"]  # integer-coded categories


def read_census(path: Path) -> pd.DataFrame:
    with gzip.open(path, "rt") as fh:
        rows = [[v.strip() for v in line.rstrip("\n").split(",")] for line in fh]
    return pd.DataFrame(rows, columns=CENSUS.columns)


def splits(folder: Path) -> dict[str, pd.DataFrame]:
    return {s: pq.read_table(folder / f"{s}.parquet").to_pandas() for s in ("train", "val", "test")}


def assert_same_encoding(a: Path, b: Path) -> None:
    sa, sb = Schema.load(a), Schema.load(b)
    assert sa.sparse == sb.sparse and sa.dense == sb.dense
    for split, frame in splits(a).items():
        pd.testing.assert_frame_equal(frame, splits(b)[split], check_exact=True)


def test_canonical_codes():
    from emm.data.encoding import canonical_codes

    values = pd.Series(["37", "37.0", "37.00", "-4.0", "2.5", "1e3", "abc", "", "0.0", "-0.0", "007"])
    assert canonical_codes(values).tolist() == ["37", "37", "37", "-4", "2.5", "1e3", "abc", "", "0", "0", "007"]


def test_csv_float_codes_in_one_file_match_the_integer_codes(census_small_raw, census_small_data, copy_raw,
                                                              tmp_path):
    """The test file writes det_ind_code as '37.0', the train file as '37': same vocabulary, same indices."""
    raw = copy_raw(census_small_raw)
    frame = read_census(raw / "census-income.test.gz")
    frame["det_ind_code"] = frame["det_ind_code"] + ".0"
    with gzip.open(raw / "census-income.test.gz", "wt") as fh:
        fh.writelines(", ".join(row) + "\n" for row in frame.itertuples(index=False))
    ingest(CENSUS, raw, tmp_path / "out", IngestConfig())
    assert_same_encoding(census_small_data, tmp_path / "out")


@pytest.mark.parametrize("stored_as", ["float64", "float-text"])
def test_parquet_float_codes_encode_like_integer_codes(census_small_raw, tmp_path, stored_as):
    """Train file int-coded, test file float-coded (as a float column, or as its text): same indices as all-int."""
    raw_int, raw_float = tmp_path / "int", tmp_path / "float"
    raw_int.mkdir()
    raw_float.mkdir()
    for name, key in (("census-income.data.gz", "train"), ("census-income.test.gz", "test")):
        frame = read_census(census_small_raw / name)
        ints = frame.astype({c: "int64" for c in CODES})
        ints.to_parquet(raw_int / f"{key}.parquet", index=False)
        floats = ints.astype({c: "float64" for c in CODES})
        if stored_as == "float-text":  # e.g. a pipeline that did astype(str) on a float column
            floats = floats.astype({c: str for c in CODES})
            assert floats["det_ind_code"].iloc[0].endswith(".0")
        (floats if key == "test" else ints).to_parquet(raw_float / f"{key}.parquet", index=False)
    spec = DatasetSpec.model_validate({**CENSUS.model_dump(), "format": "parquet", "header": True,
                                       "files": {"train": "train.parquet", "test": "test.parquet"}})
    ingest(spec, raw_int, tmp_path / "a", IngestConfig())
    ingest(spec, raw_float, tmp_path / "b", IngestConfig())
    assert_same_encoding(tmp_path / "a", tmp_path / "b")


def test_scoring_frame_with_float_codes(census_small_raw, census_small_data):
    """``emm predict`` / the MLflow scorer get pandas frames: an int column with a gap arrives as float."""
    schema = Schema.load(census_small_data)
    enc = Encoder.load(census_small_data, schema)
    frame = read_census(census_small_raw / "census-income.test.gz").head(200)
    ints = frame.astype({c: "int64" for c in CODES} | {d.name: "float64" for d in schema.dense})
    floats = ints.astype({c: "float64" for c in CODES})
    a = enc.transform(ints, source="ints", first_line=None)
    b = enc.transform(floats, source="floats", first_line=None)
    pd.testing.assert_frame_equal(a, b)
    assert (b["det_ind_code"] > 0).all()  # every code of the slice is known, none fell into 'unseen'
