"""``emm predict`` streams: a file larger than the chunk size scores exactly as in one piece, with memory
bounded by the chunk (the scorer never sees more than ``chunk_rows`` rows at once), for CSV and Parquet
inputs and outputs, rejects included at their true row numbers across chunk boundaries; a file that
breaks past its first chunk fails with a clear error and leaves the previous output whole."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emm.data.spec import resolve_dataset
from emm.errors import EMMError
from emm.pipeline.predict import CHUNK_ROWS, predict_file
from emm.tracking.loading import load_scorer
from tests.integration.test_predict_raw import logged_in_store

WHOLE = 10**9  # a chunk larger than any file here: the whole file in one piece


class CountingScorer:
    """The real scorer, noting how many rows each call scores."""

    def __init__(self, scorer) -> None:  # noqa: ANN001 - emm.tracking.pyfunc.Scorer
        self.scorer, self.calls = scorer, []

    def __getattr__(self, name: str):
        return getattr(self.scorer, name)

    def score_text(self, text: pd.DataFrame) -> pd.DataFrame:  # what emm predict scores each chunk's good rows with
        self.calls.append(len(text))
        return self.scorer.score_text(text)


@pytest.fixture(scope="module")
def scorer(census_small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-stream")
    with logged_in_store(census_small_data, root) as (_, uri, _):
        yield load_scorer(uri, root / "mlruns")


@pytest.fixture(scope="module")
def raw_rows(census_small_raw) -> pd.DataFrame:
    """Real UCI test rows with their header names, as text, and a few made unscorable on purpose."""
    columns = resolve_dataset("census-income").columns
    with gzip.open(census_small_raw / "census-income.test.gz", "rt") as f:
        frame = pd.read_csv(f, header=None, names=columns, dtype=str, skipinitialspace=True, keep_default_na=False)
    frame.loc[[5, 999, 1000, 2047], "age"] = ["", "old", "", "x"]  # rejects on both sides of chunk edges
    frame.loc[1500, "education"] = ""
    return frame


def read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


@pytest.mark.parametrize("src_kind,out_suffix", [("csv", ".csv"), ("parquet", ".parquet"), ("csv.gz", ".parquet")])
def test_chunked_scores_equal_one_piece(scorer, raw_rows, tmp_path, src_kind, out_suffix):
    src = tmp_path / f"rows.{src_kind}"
    if src_kind == "parquet":  # row groups of 700 rows: chunks of 1000 cross them
        pq.write_table(pa.Table.from_pandas(raw_rows, preserve_index=False), src, row_group_size=700)
    else:
        raw_rows.to_csv(src, index=False)
    chunked, whole = CountingScorer(scorer), CountingScorer(scorer)
    a = predict_file(chunked, src, tmp_path / f"chunked{out_suffix}", chunk_rows=1000)
    b = predict_file(whole, src, tmp_path / f"whole{out_suffix}", chunk_rows=WHOLE)
    n = len(raw_rows)
    assert max(chunked.calls) <= 1000 and len(chunked.calls) == -(-n // 1000)  # bounded: one chunk at a time
    assert whole.calls == [n - 5]
    assert (a.scored, a.rejected) == (b.scored, b.rejected) == (n - 5, 5)
    pd.testing.assert_frame_equal(read(a.output), read(b.output))
    pd.testing.assert_frame_equal(pd.read_csv(a.rejects), pd.read_csv(b.rejects))
    scores = read(a.output)
    assert list(scores.columns) == ["row", "score_income"] and scores["row"].is_monotonic_increasing
    assert set(range(1, n + 1)) - set(scores["row"]) == {6, 1000, 1001, 1501, 2048}
    rejected = pd.read_csv(a.rejects)
    assert rejected["row"].tolist() == [6, 1000, 1001, 1501, 2048]
    assert rejected["reason"].tolist() == ["missing value in 'age'", "'age' is not a number", "missing value in 'age'",
                                           "missing value in 'education'", "'age' is not a number"]
    assert scores["score_income"].nunique() > len(scores) // 2  # row-dependent scores, not a constant


def test_file_larger_than_the_default_chunk(scorer, raw_rows, tmp_path, capsys):
    big = pd.concat([raw_rows] * (CHUNK_ROWS // len(raw_rows) + 2), ignore_index=True)
    assert len(big) > CHUNK_ROWS
    src = tmp_path / "big.parquet"
    big.to_parquet(src, index=False, row_group_size=20_000)
    counting = CountingScorer(scorer)
    a = predict_file(counting, src, tmp_path / "chunked.csv", progress=True)
    assert max(counting.calls) <= CHUNK_ROWS and len(counting.calls) == -(-len(big) // CHUNK_ROWS)
    assert f"{len(big)}/{len(big)}" in capsys.readouterr().err  # the progress bar counted every row
    b = predict_file(scorer, src, tmp_path / "whole.csv", chunk_rows=WHOLE)
    pd.testing.assert_frame_equal(read(a.output), read(b.output))
    first = read(a.output).set_index("row")["score_income"]
    repeat = len(raw_rows)
    np.testing.assert_allclose(first.loc[1:repeat].to_numpy(), first.loc[repeat + 1:2 * repeat].to_numpy(), rtol=1e-6)


def test_a_break_past_the_first_chunk_keeps_the_previous_output(scorer, raw_rows, tmp_path):
    src = tmp_path / "rows.csv"
    raw_rows.to_csv(src, index=False)
    out = tmp_path / "out.csv"
    predict_file(scorer, src, out, chunk_rows=500)
    before = out.read_bytes()
    lines = src.read_text().splitlines()
    lines[1800] += ",an extra field"  # past the first chunks: the parser meets it mid-stream
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(EMMError, match="cannot be read as CSV"):
        predict_file(scorer, broken, out, chunk_rows=500)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.csv", "out.csv", "out.rejected.csv", "rows.csv"]
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(raw_rows.columns) + "\n")
    with pytest.raises(EMMError, match="has no rows"):
        predict_file(scorer, empty, tmp_path / "none.csv")
    assert not (tmp_path / "none.csv").exists()
