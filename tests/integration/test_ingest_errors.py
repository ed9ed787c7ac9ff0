"""Bad input: one clear message naming the file, line and column; exit 2; nothing half-written."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emm.cli import app
from emm.pipeline.params import IngestConfig
from emm.data.ingest import ingest
from emm.data.spec import DatasetSpec, resolve_dataset
from emm.errors import EMMError

CENSUS = resolve_dataset("census-income")


def rewrite_line(path: Path, line_no: int, edit) -> None:
    """Apply `edit` to 1-based line `line_no` of a gzipped file."""
    with gzip.open(path, "rt") as fh:
        lines = fh.readlines()
    lines[line_no - 1] = edit(lines[line_no - 1])
    with gzip.open(path, "wt") as fh:
        fh.writelines(lines)


def run_ingest(raw: Path, out: Path, spec: DatasetSpec = CENSUS, **kw) -> None:
    ingest(spec, raw, out, IngestConfig(**kw))


@pytest.fixture
def raw(copy_raw, census_small_raw) -> Path:
    return copy_raw(census_small_raw)


@pytest.fixture
def previous_output(tmp_path, census_small_data) -> Path:
    """An output folder holding a previous good ingestion, which a failed run must leave untouched."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(census_small_data, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_untouched(out: Path, before: dict[str, bytes]) -> None:
    assert snapshot(out) == before
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


def test_missing_file_named(raw, previous_output):
    before = snapshot(previous_output)
    (raw / "census-income.test.gz").unlink()
    with pytest.raises(EMMError, match=r"raw file missing: looked for .*census-income\.test"):
        run_ingest(raw, previous_output)
    assert_untouched(previous_output, before)


def test_wrong_column_count_names_line(raw, previous_output):
    before = snapshot(previous_output)
    rewrite_line(raw / "census-income.data.gz", 4321, lambda s: s.rstrip("\n") + ", extra\n")
    with pytest.raises(EMMError, match=r"census-income\.data\.gz, line 4321: expected 42 columns, found 43"):
        run_ingest(raw, previous_output)
    assert_untouched(previous_output, before)


def test_short_row_in_test_file_names_line(raw, previous_output):
    before = snapshot(previous_output)
    rewrite_line(raw / "census-income.test.gz", 17, lambda s: ", ".join(s.split(", ")[:30]) + "\n")
    with pytest.raises(EMMError, match=r"census-income\.test\.gz, line 17: expected 42 columns, found 30"):
        run_ingest(raw, previous_output)
    assert_untouched(previous_output, before)


def test_non_numeric_dense_value_names_line_and_column(raw, previous_output):
    before = snapshot(previous_output)
    rewrite_line(raw / "census-income.test.gz", 2500, lambda s: "abc" + s[s.index(","):])
    with pytest.raises(EMMError, match=r"census-income\.test\.gz, line 2500, column 'age': dense value 'abc' is not"):
        run_ingest(raw, previous_output)
    assert_untouched(previous_output, before)


def test_missing_dense_value_is_an_error_by_default(raw, tmp_path):
    rewrite_line(raw / "census-income.data.gz", 10, lambda s: " " + s[s.index(","):])
    with pytest.raises(EMMError, match=r"line 10, column 'age': dense value is missing"):
        run_ingest(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_label_is_an_error(raw, tmp_path):
    rewrite_line(raw / "census-income.data.gz", 12, lambda s: s.rsplit(",", 1)[0] + ", \n")
    with pytest.raises(EMMError, match=r"line 12, column 'income_50k': the label is missing"):
        run_ingest(raw, tmp_path / "out")


@pytest.mark.parametrize("content", [b"", gzip.compress(b"")], ids=["zero-bytes", "empty-gzip"])
def test_empty_file(raw, tmp_path, content):
    (raw / "census-income.data.gz").write_bytes(content)
    with pytest.raises(EMMError, match=r"census-income\.data\.gz.*(empty|no data rows|no rows)"):
        run_ingest(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_gzip(raw, tmp_path):
    path = raw / "census-income.test.gz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EMMError, match=r"census-income\.test\.gz"):
        run_ingest(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_dataset():
    with pytest.raises(EMMError, match=r"unknown dataset 'nope': known datasets are \['ali-ccp', 'aliexpress', "
                                       r"'census-income'\]"):
        resolve_dataset("nope")


def test_unknown_task():
    with pytest.raises(EMMError, match=r"unknown task\(s\) \['salary'\]"):
        CENSUS.select_tasks(["income", "salary"])


def test_label_declared_as_feature_is_refused(raw, tmp_path):
    columns = CENSUS.columns
    spec = CENSUS.model_copy(update={"sparse": [c for c in columns if c not in CENSUS.dense + ["instance_weight",
                                                                                                  "income_50k"]]})
    assert "marital_stat" in spec.sparse
    with pytest.raises(EMMError, match=r"column 'marital_stat' is the label of task 'marital'"):
        run_ingest(raw, tmp_path / "out", spec)


def test_leaked_label_copy_is_caught_by_the_audit(tmp_path):
    """A feature that is the label under another name (the AUC=1.0 trap) is refused."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 2, n)
    frame = pd.DataFrame({"f1": rng.normal(size=n), "cat": rng.choice(list("abc"), n),
                          "conv_copy": y * 3.0, "label": y})
    raw = tmp_path / "raw"
    raw.mkdir()
    frame.iloc[:1500].to_csv(raw / "train.csv", index=False)
    frame.iloc[1500:].to_csv(raw / "test.csv", index=False)
    spec = DatasetSpec.model_validate({
        "name": "leaky", "files": {"train": "train.csv", "test": "test.csv"},
        "carve": {"source": "test", "into": ["val", "test"], "fraction": 0.5},
        "dense": ["f1", "conv_copy"], "sparse": ["cat"],
        "tasks": {"y": {"column": "label", "threshold": 0.5}}, "default_tasks": ["y"],
    })
    with pytest.raises(EMMError, match=r"feature 'conv_copy' alone predicts task 'y' with AUC 1\.0000"):
        run_ingest(raw, tmp_path / "out", spec)


def test_task_named_like_a_feature_is_refused(raw, tmp_path):
    spec = CENSUS.model_copy(update={"tasks": {**CENSUS.tasks, "age": CENSUS.tasks["income"]},
                                     "default_tasks": ["age", "marital"]})
    with pytest.raises(EMMError, match=r"task name\(s\) \['age'\] equal feature column names"):
        run_ingest(raw, tmp_path / "out", spec)


def test_header_mismatch_named(tmp_path, shared_data):
    raw = tmp_path / "raw"
    raw.mkdir()
    src = shared_data / "ali-ccp"
    for p in src.iterdir():
        text = p.read_text()
        if "train" in p.name:
            text = text.replace("D853", "D999", 1)
        (raw / p.name).write_text(text)
    spec = resolve_dataset("ali-ccp").model_copy(update={"columns": None})
    with pytest.raises(EMMError, match=r"declared column\(s\) \['D853'\] are not in the file"):
        run_ingest(raw, tmp_path / "out", spec)


def test_cli_prints_message_without_traceback_and_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["ingest", "census-income", "--raw-dir", str(tmp_path / "nowhere"),
                                      "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    assert not os.path.exists(tmp_path / "out")


def edit_lines(path: Path, edit) -> None:
    """Replace the (bytes) lines of a gzipped file by ``edit(lines)``."""
    with gzip.open(path, "rb") as fh:
        lines = fh.readlines()
    with gzip.open(path, "wb") as fh:
        fh.writelines(edit(lines))


def set_field(line: bytes, column: str, value: bytes) -> bytes:
    fields = line.rstrip(b"\n").split(b", ")
    fields[CENSUS.columns.index(column)] = value
    return b", ".join(fields) + b"\n"


@pytest.mark.parametrize("name", ["census-income.data.gz", "census-income.test.gz"])
def test_infinite_dense_value_names_file_line_and_column(raw, previous_output, name):
    """The same message whether the value sits in the first train chunk (the leakage audit) or elsewhere."""
    before = snapshot(previous_output)
    edit_lines(raw / name, lambda lines: [set_field(s, "age", b"inf") if i == 4 else s for i, s in enumerate(lines)])
    with pytest.raises(EMMError, match=rf"{name.replace('.', '[.]')}, line 5, column 'age': dense value 'inf' is "
                                       rf"not a finite number"):
        run_ingest(raw, previous_output)
    assert_untouched(previous_output, before)


def test_line_numbers_count_blank_lines(raw, tmp_path):
    """Blank lines are skipped as rows but still counted as lines: errors point at the true line."""
    def edit(lines):
        lines = [set_field(s, "age", b"abc") if i == 299 else s for i, s in enumerate(lines)]
        return lines[:100] + [b"\n", b"\r\n"] + lines[100:]  # lines 101-102 blank: 'abc' moves to line 302
    edit_lines(raw / "census-income.data.gz", edit)
    with pytest.raises(EMMError, match=r"census-income\.data\.gz, line 302, column 'age': dense value 'abc'"):
        run_ingest(raw, tmp_path / "out")


def test_column_count_error_counts_blank_lines(raw, tmp_path):
    edit_lines(raw / "census-income.test.gz",
               lambda lines: lines[:9] + [b"\n"] + [s.rstrip(b"\n") + b", extra\n" if i == 1000 else s
                                                     for i, s in enumerate(lines[9:], start=9)])
    with pytest.raises(EMMError, match=r"census-income\.test\.gz, line 1002: expected 42 columns, found 43"):
        run_ingest(raw, tmp_path / "out")


def test_blank_lines_do_not_change_the_result(raw, census_small_data, tmp_path):
    import pyarrow.parquet as pq

    edit_lines(raw / "census-income.data.gz", lambda lines: [b"\n"] + lines[:3000] + [b"\n\n"] + lines[3000:]
               + [b"\n"])
    from emm.data.schema import Schema

    run_ingest(raw, tmp_path / "out", block_mb=1)  # several chunks, so blank lines also sit inside later ones
    a, b = Schema.load(census_small_data), Schema.load(tmp_path / "out")
    assert a.sparse == b.sparse and a.dense == b.dense and a.rows == b.rows
    pd_a = pq.read_table(census_small_data / "train.parquet").to_pandas()
    pd_b = pq.read_table(tmp_path / "out" / "train.parquet").to_pandas()
    assert pd_a.equals(pd_b)


def test_non_utf8_byte_names_its_true_line_and_column(raw, previous_output):
    before = snapshot(previous_output)
    edit_lines(raw / "census-income.data.gz",
               lambda lines: [set_field(s, "education", b"Childr\xe9n") if i == 2500 else s
                              for i, s in enumerate(lines)])
    with pytest.raises(EMMError, match=r"census-income\.data\.gz, line 2501, column 'education': byte b'\\xe9' "
                                       r"is not valid UTF-8"):
        run_ingest(raw, previous_output)
    assert_untouched(previous_output, before)


def test_leftover_of_a_killed_ingest_is_removed_by_the_next_run(raw, tmp_path):
    """A run killed with SIGKILL cannot clean up; the next run on the same output removes its temp folder."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    killed = ("import os, signal, sys\nfrom pathlib import Path\nfrom emm.io import atomic_dir\n"
              "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
              "    (tmp / 'train.parquet').write_bytes(b'PAR1 half a file')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", killed, str(out)], env=env, capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "train.parquet").exists()
    run_ingest(raw, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (out / "train.parquet").stat().st_size > 1000
