"""The raw-column encoder works once per distinct value (``emm.data.distinct``) and must give exactly what the
rules give row by row: a small per-row reference here, on adversarial columns (unseen values, empty strings,
NaN/None, ' ?' spellings, numbers as text with spaces, ints vs floats, huge values, values exactly on bucket
edges), in the dtypes rows arrive in (pandas' Arrow-backed ``str``, object, int64, float64). A bad dense value
still names its file, line and column."""

from __future__ import annotations

import bisect
import re

import numpy as np
import pandas as pd
import pytest

from emm.data.encoding import Encoder, parse_dense, to_numbers
from emm.errors import EMMError

VOCAB = ["", "0", "37", "?", "Private", "Ünïcode"]
EDGES = [0.0, 1.0, 52.0]
LO, HI = -2.0, 60.0
N = 14

SPARSE = {  # column -> raw values (N each), in the dtype given by its name
    "s_str": ["Private", " Private ", "", "?", " ?", "37.0", "+37.00", "37.", "3.5", "zzz", None, "Ünïcode", "0",
              "-0.0"],
    "s_obj": ["37.0", None, "Private", np.nan, " ?", "?", "", "037.0", "x", "Private", "37", "1e1", "0.0", "Ünïcode"],
    "s_int": [37, 0, 5, 37, 1, 0, 0, 37, 2, 3, 37, 0, 4, 5],
    "s_float": [37.0, np.nan, 3.5, 0.0, 37.0, -0.0, 1e20, 0.5, 37.0, np.nan, 2.0, 0.0, 37.0, 3.5],
}
DENSE = {
    "d_str": ["0", " 7 ", "52.0", "1e1", "99999999999999999999", "-3", "+4", ".5", "5.", "1", "52", "-0.0", "1e308",
              "9007199254740993"],
    "d_obj": ["1", "52", "0", "0.0", "1.000", "51.999", "52.001", "60", "61", "-2", "-2.5", "1", "0", "7"],
    "d_int": [0, 1, 52, 53, -5, 7, 7, 0, 1, 2**53 + 1, 10**12, 52, 1, 0],
    "d_float": [0.0, 1.0, 52.0, -0.0, 0.5, 1e-300, 59.9, 60.0, 100.0, 1.5, 52.0, 0.0, 1.0, 7.25],
}


def frame() -> pd.DataFrame:
    columns = {c: pd.Series(v, dtype="str" if c.endswith("_str") else object) for c, v in {**SPARSE, **DENSE}.items()}
    columns.update({c: pd.Series(v, dtype=np.int64) for c, v in {**SPARSE, **DENSE}.items() if c.endswith("_int")})
    columns.update({c: pd.Series(v, dtype=np.float64) for c, v in {**SPARSE, **DENSE}.items() if c.endswith("_float")})
    return pd.DataFrame(columns)


def encoder() -> Encoder:
    dense = list(DENSE)
    return Encoder(sparse=list(SPARSE), dense=dense, bucketed=dense, n_buckets=4,
                   vocab={**{c: VOCAB for c in SPARSE}, **{Encoder.bucket_name(c): ["b"] * 4 for c in dense}},
                   minimum={c: LO for c in dense}, maximum={c: HI for c in dense}, edges={c: EDGES for c in dense})


# ---- the per-row reference -------------------------------------------------------------------------------------
def text_of(column: pd.Series) -> list[str | None]:
    """Each row's text (None: missing): an object column of strings as it is, any other column stripped."""
    taken_as_is = column.dtype == object and isinstance(column.iloc[0], str)
    out = []
    for value in column:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            out.append(None)
        else:
            out.append(value if taken_as_is else str(value).strip())
    return out


def canonical(value: str) -> str:
    return str(int(value.split(".", 1)[0])) if re.fullmatch(r"[+-]?\d+\.0*", value) else value


def reference(frame: pd.DataFrame) -> dict[str, list]:
    out: dict[str, list] = {}
    lookup = {v: i + 1 for i, v in enumerate(VOCAB)}
    for col in SPARSE:
        out[col] = [0 if t is None else lookup.get(canonical(t), 0) for t in text_of(frame[col])]
    for col in DENSE:
        # pandas reads a column of number texts as a whole (integers, or floats), so the reference does too
        numbers = pd.to_numeric(pd.Series(text_of(frame[col]), dtype=object), errors="coerce").tolist()
        out[Encoder.bucket_name(col)] = [bisect.bisect_left(EDGES, x) + 1 for x in numbers]
        out[col] = [np.float32(min(max((x - LO) / (HI - LO), 0.0), 1.0)) for x in numbers]
    return out


def test_encoder_equals_the_per_row_reference_on_adversarial_columns():
    raw = frame()
    got = encoder().transform(raw, source="rows.csv", first_line=1)
    expected = reference(raw)
    assert list(got.columns) == encoder().sparse_features + list(DENSE)
    for col, values in expected.items():
        column = got[col].to_numpy()
        assert column.dtype == (np.float32 if col in DENSE else np.int32), col
        np.testing.assert_array_equal(column, np.array(values, dtype=column.dtype), err_msg=col)
    assert got["s_str"].tolist()[:8] == [5, 5, 1, 4, 4, 3, 3, 3]  # stripped, canonical: what the reference means
    assert got["d_str_bucket"].tolist()[9:11] == [2, 3]  # a value exactly on an edge sits in the bin it closes


def test_any_row_order_and_chunking_gives_the_same_rows():
    raw = frame()
    enc = encoder()
    whole = enc.transform(raw, source="rows.csv", first_line=1)
    order = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(N - 1)])  # row 0 (a string) stays first:
    # an object column is taken as text by its first value, so that row stays a string (see ``text_of``)
    shuffled = enc.transform(raw.iloc[order].reset_index(drop=True), source="rows.csv", first_line=1)
    pd.testing.assert_frame_equal(shuffled, whole.iloc[order].reset_index(drop=True))
    parts = [enc.transform(raw.iloc[i:i + 5].reset_index(drop=True), source="rows.csv", first_line=1)
             for i in range(0, N, 5)]
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)


def test_dense_values_are_parsed_once_per_distinct_value(monkeypatch):
    """No per-row parsing: 30,000 rows of three distinct values reach pandas' parser as at most four values."""
    rows = 30_000
    raw = frame().iloc[np.arange(rows) % 3].reset_index(drop=True)
    seen: list[int] = []
    real = pd.to_numeric

    def counting(arg, *args, **kwargs):  # noqa: ANN001, ANN202 - pandas' signature
        seen.append(len(arg))
        return real(arg, *args, **kwargs)

    monkeypatch.setattr(pd, "to_numeric", counting)
    got = encoder().transform(raw, source="rows.csv", first_line=1)
    monkeypatch.undo()
    assert seen and max(seen) <= 4
    pd.testing.assert_frame_equal(got, encoder().transform(frame().iloc[np.arange(rows) % 3].reset_index(drop=True),
                                                           source="rows.csv", first_line=1))


def test_to_numbers_reads_text_as_pandas_reads_the_column():
    cases = [["1", " 2 ", "x", "", "1e400", "9007199254740993", "-0.0"], ["9007199254740993", "5"], ["7", "nan"]]
    for values in cases:
        for dtype in ("str", object):
            column = pd.Series(values * 3, dtype=dtype)
            expected = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
            got = to_numbers(column)
            np.testing.assert_array_equal(got, expected)
            assert np.array_equal(np.signbit(got), np.signbit(expected))


def test_missing_dense_values_are_imputed_on_a_pandas_string_column():
    """``dense_missing: zero`` on the reader's own column type (pandas' Arrow-backed ``str``): empty, '?', 'NULL'
    and 'nan' become 0 (pandas' read-only result made this crash before); a value that is no number stays an error."""
    column = pd.Series(["3", "", "?", "NULL", "nan", "7"] * 2, dtype="str")
    got = parse_dense(column, "age", source="f.csv", first_line=2, missing="zero")
    assert got.tolist() == [3.0, 0.0, 0.0, 0.0, 0.0, 7.0] * 2
    with pytest.raises(EMMError, match=r"line 3, column 'age': dense value 'x' is not a finite number$"):
        parse_dense(pd.Series(["", "x"], dtype="str"), "age", source="f.csv", first_line=2, missing="zero")


@pytest.mark.parametrize("dtype", ["str", object])
def test_a_bad_dense_value_names_its_line_and_column(dtype):
    bad = pd.Series(["1", "2", "old", "4"], dtype=dtype)
    with pytest.raises(EMMError, match=r"^f\.csv, line 12, column 'age': dense value 'old' is not a finite number "
                                       r"\(set dense_missing: zero to impute 0\)$"):
        parse_dense(bad, "age", source="f.csv", first_line=10)
    with pytest.raises(EMMError, match=r"^f\.csv, line 9, column 'age': dense value 'old' is not a finite number$"):
        parse_dense(bad, "age", source="f.csv", first_line=np.array([3, 5, 9, 11]), missing="zero")
    empty = pd.Series(["1", "", "2"], dtype=dtype)
    with pytest.raises(EMMError, match=r"^f\.csv, line 4, column 'age': dense value is missing \(set dense_missing"):
        parse_dense(empty, "age", source="f.csv", first_line=3)
    raw = frame()
    raw["d_str"] = pd.Series(["1"] * 5 + [" x1 "] + ["2"] * (N - 6), dtype="str")
    with pytest.raises(EMMError, match=r"^rows\.csv, line 25, column 'd_str': dense value 'x1' is not a finite"):
        encoder().transform(raw, source="rows.csv", first_line=20)
    raw["d_str"] = pd.Series(["1"] * (N - 1) + [None], dtype="str")  # a null (a scoring frame's NaN)
    with pytest.raises(EMMError, match=r"^model input, column 'd_str': dense value nan is not a finite number"):
        encoder().transform(raw, source="model input", first_line=None)
