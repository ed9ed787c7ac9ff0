"""What ``emm predict`` and the pyfunc refuse, over a real logged model on a Census slice: an output (or its
rejects file) that is the input, by any name (issue 22, item 3), an output that is a folder; a required
column given twice (item 6); and, through ``mlflow.pyfunc``, a frame with bad rows, refused whole with
every bad row named (item 8, the REST server's behaviour; ``test_rest_serving.py`` checks the HTTP side).
A fixed rejects file scored again (the natural follow-up of a run with rejects) works, and an empty
categorical value the model was trained on is scored by both."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from emm.cli import app
from emm.data.encoding import Encoder
from emm.data.ingest import ingest
from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.errors import EMMError
from emm.pipeline.params import IngestConfig
from emm.pipeline.predict import predict_file, predict_stage
from emm.tracking.loading import load_scorer
from emm.tracking.pyfunc import raw_example
from emm.tracking.store import configure
from tests.integration.test_predict_raw import logged_in_store


@pytest.fixture(scope="module")
def logged(census_small_data, tmp_path_factory):
    with logged_in_store(census_small_data, tmp_path_factory.mktemp("predict-refusals")) as (params, uri, _):
        yield params, uri


@pytest.fixture
def rows(census_small_data) -> pd.DataFrame:
    return raw_example(census_small_data, rows=10).astype(str)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def emm(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    said = " ".join(result.output.split())  # rich wraps long lines at the runner's terminal width
    assert "Traceback" not in said and (result.exception is None or isinstance(result.exception, SystemExit)), said
    return result.exit_code, said


def test_an_output_or_rejects_file_that_is_the_input_is_refused(logged, rows, tmp_path):
    params, uri = logged
    rows.loc[2, "age"] = "old"
    src = tmp_path / "s.csv"
    rows.to_csv(src, index=False)
    assert predict_stage(uri, src, tmp_path / "r2.csv", params).rejected == 1
    fixed = pd.read_csv(tmp_path / "r2.rejected.csv", dtype=str, keep_default_na=False)
    fixed.loc[0, "age"] = "40"  # the user fixes the rejects in place, to score them again
    fixed.to_csv(tmp_path / "r2.rejected.csv", index=False)
    (tmp_path / "link.csv").symlink_to(src)
    os.link(src, tmp_path / "hard.csv")
    before = snapshot(tmp_path)
    cases = [  # (input, output, what the message says)
        (src, src, r"--output .*s\.csv is the input file"),
        (src, tmp_path / "link.csv", r"--output .*link\.csv is the input file"),  # a symlink to it
        (src, tmp_path / "hard.csv", r"--output .*hard\.csv is the input file"),  # a hard link to it
        (tmp_path / "link.csv", src, r"--output .*s\.csv is the input file"),
        (src, tmp_path / "sub" / ".." / "s.csv", r"is the input file"),
        # the rejects file of the output would be the input: a clean run would delete it, one with rejects
        # overwrite it
        (tmp_path / "r2.rejected.csv", tmp_path / "r2.csv",
         r"the rejects file of --output .*r2\.csv would be .*r2\.rejected\.csv, which is the input file"),
        (tmp_path / "r2.rejected.csv", tmp_path / "r2.parquet", r"which is the input file"),
    ]
    (tmp_path / "sub").mkdir()
    for source, output, message in cases:
        with pytest.raises(EMMError, match=message):
            predict_stage(uri, source, output, params)
        assert snapshot(tmp_path) == before, (source, output)  # nothing written, replaced or removed
    code, said = emm("predict", "--model-uri", uri, "--input", str(tmp_path / "r2.rejected.csv"), "--output",
                     str(tmp_path / "r2.csv"), "--params", str(params))
    assert code == 2 and "which is the input file" in said and "name another --output" in said, said
    assert snapshot(tmp_path) == before


def test_an_output_that_is_a_folder_is_a_user_error(logged, rows, tmp_path):
    params, uri = logged
    rows.to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "scores").mkdir()
    code, said = emm("predict", "--model-uri", uri, "--input", str(tmp_path / "in.csv"), "--output",
                     str(tmp_path / "scores"), "--params", str(params))
    assert code == 2 and "is a folder" in said and "scores.csv" in said, said
    (tmp_path / "out.rejected.csv").mkdir()  # the rejects file's name taken by a folder
    with pytest.raises(EMMError, match=r"out\.rejected\.csv, which is a folder"):
        predict_stage(uri, tmp_path / "in.csv", tmp_path / "out.csv", params)
    (tmp_path / "file").write_text("")
    with pytest.raises(EMMError, match=r"file is a file, not a folder"):
        predict_stage(uri, tmp_path / "in.csv", tmp_path / "file" / "out.csv", params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.csv", "out.rejected.csv", "scores"]
    assert not any((tmp_path / "scores").iterdir())
    with pytest.raises(EMMError, match=r"input .*scores is a folder; name the CSV or Parquet file"):
        predict_stage(uri, tmp_path / "scores", tmp_path / "out2.csv", params)  # the input a folder


def test_fixed_rejects_scored_again(logged, rows, tmp_path):
    """The rejects file, fixed in part, scored into a new output: its own ``row``/``reason`` columns are kept
    in the new rejects (as ``input_row``/``input_reason``) beside this run's."""
    params, uri = logged
    rows.loc[[2, 6], "age"] = ["old", "older"]
    rows.to_csv(tmp_path / "r.csv", index=False)
    predict_stage(uri, tmp_path / "r.csv", tmp_path / "r-scores.csv", params)
    fixed = pd.read_csv(tmp_path / "r-scores.rejected.csv", dtype=str, keep_default_na=False)
    assert fixed["row"].tolist() == ["3", "7"]
    fixed.loc[0, "age"] = "40"
    fixed.to_csv(tmp_path / "fixed.csv", index=False)
    report = predict_stage(uri, tmp_path / "fixed.csv", tmp_path / "again.csv", params)
    assert (report.scored, report.rejected) == (1, 1)
    again = pd.read_csv(report.rejects, dtype=str, keep_default_na=False)
    assert list(again.columns[:4]) == ["row", "reason", "input_row", "input_reason"]
    assert again.loc[0, ["row", "reason", "input_row", "age"]].tolist() == ["2", "'age' is not a number", "7", "older"]
    assert list(again.columns[4:]) == list(rows.columns)


def with_header(frame: pd.DataFrame, path: Path, names: list[str]) -> Path:
    """``frame`` as a CSV whose header row is ``names`` (pandas would never write a repeated name)."""
    body = frame.to_csv(index=False).split("\n", 1)[1]
    path.write_text(",".join(names) + "\n" + body)
    return path


def test_a_required_column_given_twice_is_refused(logged, rows, tmp_path):
    params, uri = logged
    twice = rows.assign(extra="99")
    names = [*rows.columns, "age"]  # `age,...,age`: pandas would read the second as `age.1`
    csv = with_header(twice, tmp_path / "twice.csv", names)
    first = list(rows.columns).index("age") + 1
    with pytest.raises(EMMError, match=rf"twice\.csv: column 'age' appears 2 times in the header \(fields {first} "
                                       rf"and {len(names)}\); .*remove or rename the extra copies"):
        predict_stage(uri, csv, tmp_path / "out.csv", params)
    table = pa.Table.from_arrays([pa.array(twice[c]) for c in twice.columns], names=names)
    pq.write_table(table, tmp_path / "twice.parquet")
    with pytest.raises(EMMError, match=r"twice\.parquet: column 'age' appears 2 times"):
        predict_stage(uri, tmp_path / "twice.parquet", tmp_path / "out.csv", params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twice.csv", "twice.parquet"]
    # a column the model does not read may repeat: it is not scored from
    ok = with_header(rows.assign(a="1", b="2"), tmp_path / "notes.csv", [*rows.columns, "note", "note"])
    assert predict_stage(uri, ok, tmp_path / "out.csv", params).scored == len(rows)
    # a frame: the scorer refuses it; the pyfunc (and so the REST server) never gets that far, MLflow's
    # schema check refuses a frame with a repeated column first
    frame = pd.concat([rows, rows[["age"]].assign(age="99")], axis=1)
    with pytest.raises(EMMError, match=r"model input: column 'age' appears 2 times; .*remove or rename"):
        load_scorer(uri, params.parent / "mlruns").predict(frame)
    configure(params.parent / "mlruns")
    with pytest.raises(mlflow.exceptions.MlflowException, match="Failed to enforce schema"):
        mlflow.pyfunc.load_model(uri).predict(frame)


def test_pyfunc_refuses_a_frame_with_bad_rows_naming_every_one(logged, census_small_data):
    params, uri = logged
    configure(params.parent / "mlruns")
    pyfunc = mlflow.pyfunc.load_model(uri)
    frame = raw_example(census_small_data, rows=40)
    frame["age"] = frame["age"].astype(object)
    frame.loc[2, "age"] = "forty"
    frame.loc[5, "education"] = ""  # scored as an unseen category before: emm predict rejects it
    with pytest.raises(EMMError) as caught:
        pyfunc.predict(frame)
    message = str(caught.value)
    assert message.startswith("2 of 40 rows cannot be scored, so none was: row 2: 'age' is not a number; "
                              "row 5: missing value in 'education'"), message
    assert isinstance(caught.value, mlflow.exceptions.MlflowException)  # what the REST server answers 400 to
    assert caught.value.get_http_status_code() == 400 and "stack_trace" not in caught.value.serialize_as_json()
    frame.loc[10:34, "age"] = "x"  # 27 bad rows: the first 20 named, and how many more
    message = str(pytest.raises(EMMError, pyfunc.predict, frame).value)
    assert message.startswith("27 of 40 rows cannot be scored") and "row 27: 'age'" in message, message
    assert "row 28" not in message and "and 7 more" in message, message
    assert len(pyfunc.predict(frame.drop(index=[2, 5, *range(10, 35)]))) == 40 - 27


@pytest.fixture(scope="module")
def blank_category(census_small_raw, tmp_path_factory):
    """A model trained on Census rows where ``hisp_origin`` is sometimes an empty field: '' is in its
    vocabulary, a value it was trained on."""
    root = tmp_path_factory.mktemp("blank-category")
    columns = resolve_dataset("census-income").columns
    at = columns.index("hisp_origin")
    raw = root / "raw"
    raw.mkdir()
    for name, rows in (("census-income.data.gz", 1500), ("census-income.test.gz", 1000)):
        with gzip.open(census_small_raw / name, "rt") as src, gzip.open(raw / name, "wt") as dst:
            for i, line in zip(range(rows), src):
                fields = line.rstrip("\n").split(", ")
                if i % 7 == 0:
                    fields[at] = ""
                dst.write(", ".join(fields) + "\n")
    data = root / "data"
    ingest(resolve_dataset("census-income"), raw, data, IngestConfig())
    assert "" in Encoder.load(data, Schema.load(data)).vocab["hisp_origin"]
    with logged_in_store(data, root) as (_, uri, _):
        yield uri, root / "mlruns", data


def test_an_empty_category_the_model_was_trained_on_is_scored(blank_category, tmp_path):
    """Both checks (``emm predict``'s rejects, the pyfunc's refusal) are ``Scorer.validate``: an empty field
    is missing only where the model never saw one."""
    uri, store, data = blank_category
    rows = raw_example(data, rows=6).astype(str)
    rows.loc[1, "hisp_origin"] = ""
    configure(store)
    pyfunc = mlflow.pyfunc.load_model(uri)
    scores = pyfunc.predict(rows)
    assert len(scores) == 6 and scores["score_income"].between(0, 1).all()
    rows.to_csv(tmp_path / "in.csv", index=False)
    report = predict_file(load_scorer(uri, store), tmp_path / "in.csv", tmp_path / "out.csv")
    assert (report.scored, report.rejected) == (6, 0)
    rows.loc[3, "education"] = ""  # never empty in training: missing
    with pytest.raises(EMMError, match=r"^1 of 6 rows cannot be scored, so none was: row 3: missing value in "
                                       r"'education' \("):
        pyfunc.predict(rows)
    rows.to_csv(tmp_path / "in.csv", index=False)
    report = predict_file(load_scorer(uri, store), tmp_path / "in.csv", tmp_path / "out.csv")
    assert (report.scored, report.rejected) == (5, 1)
