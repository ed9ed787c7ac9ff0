"""Labels that would make a task untrainable or silently wrong are refused at ingest, with the split/line named."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from emm.data.options import IngestConfig
from emm.data.ingest import ingest
from emm.data.spec import DatasetSpec, TaskSpec, resolve_dataset
from emm.errors import EMMError

CENSUS = resolve_dataset("census-income")


def rewrite_gz(path: Path, edit) -> None:
    """Apply ``edit(line_no, text)`` to every line of a gzipped text file (1-based line numbers)."""
    with gzip.open(path, "rt") as fh:
        lines = fh.readlines()
    with gzip.open(path, "wt") as fh:
        fh.writelines(edit(i + 1, line) for i, line in enumerate(lines))


@pytest.fixture
def raw(copy_raw, census_small_raw) -> Path:
    return copy_raw(census_small_raw)


def with_tasks(**tasks: dict) -> DatasetSpec:
    declared = {**CENSUS.tasks, **{name: TaskSpec.model_validate(t) for name, t in tasks.items()}}
    return CENSUS.model_copy(update={"tasks": declared})


def test_split_without_positives_is_refused_naming_split_and_task(raw, tmp_path):
    """No '50000+.' in the test file: val and test would hold no income positive (AUC undefined later)."""
    rewrite_gz(raw / "census-income.test.gz", lambda _, s: s.replace("50000+.", "- 50000."))
    with pytest.raises(EMMError, match=r"task 'income' has no positive rows in split\(s\) \['val', 'test'\]"):
        ingest(CENSUS, raw, tmp_path / "out", IngestConfig())
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_split_without_negatives_is_refused(raw, tmp_path):
    """Every Census row is from year 94 or 95, so 'year > 0' is positive everywhere."""
    spec = with_tasks(any_year={"column": "year", "threshold": 0})
    with pytest.raises(EMMError, match=r"task 'any_year' has no negative rows in split\(s\) "
                                       r"\['train', 'val', 'test'\].*threshold"):
        ingest(spec, raw, tmp_path / "out", IngestConfig(), tasks=["income", "any_year"])
    assert not (tmp_path / "out").exists()


def test_aliexpress_sample_without_val_conversions_is_refused(shared_data, tmp_path):
    """The published sample has 2 conversions in 100 train rows; the 10% val carve gets none of them."""
    with pytest.raises(EMMError, match=r"dataset 'aliexpress': task 'conversion' has no positive rows in "
                                       r"split\(s\) \['val'\]"):
        ingest(resolve_dataset("aliexpress"), shared_data / "aliexpress", tmp_path / "ae", IngestConfig())
    schema = ingest(resolve_dataset("aliexpress"), shared_data / "aliexpress", tmp_path / "ae", IngestConfig(),
                    tasks=["click"])
    assert {t.name: t.positives for t in schema.tasks}["click"] == {"train": 54, "val": 6, "test": 10}


def test_undeclared_label_value_is_refused(raw, tmp_path):
    spec = with_tasks(income={"column": "income_50k", "positive_values": ["50000+."],
                              "negative_values": ["- 50000."]})
    rewrite_gz(raw / "census-income.test.gz",
               lambda n, s: s.rsplit(",", 1)[0] + ", maybe\n" if n == 77 else s)
    with pytest.raises(EMMError, match=r"census-income\.test\.gz, line 77, column 'income_50k': label 'maybe' of "
                                       r"task 'income' is neither a positive value \['50000\+\.'\] nor a declared "
                                       r"negative value \['- 50000\.'\]"):
        ingest(spec, raw, tmp_path / "out", IngestConfig())
    assert not (tmp_path / "out").exists()


def test_declared_negatives_give_the_same_labels(census_small_raw, census_small_data, tmp_path):
    spec = with_tasks(income={"column": "income_50k", "positive_values": ["50000+."],
                              "negative_values": ["- 50000."]})
    schema = ingest(spec, census_small_raw, tmp_path / "out", IngestConfig())
    assert next(t for t in schema.tasks if t.name == "income").rule["negative_values"] == ["- 50000."]
    for split in ("train", "val", "test"):
        a = pq.read_table(census_small_data / f"{split}.parquet", columns=["income"]).to_pandas()
        b = pq.read_table(tmp_path / "out" / f"{split}.parquet", columns=["income"]).to_pandas()
        assert a.equals(b)


@pytest.mark.parametrize("task, message", [
    ({"column": "x", "threshold": 0.5, "negative_values": ["0"]}, "negative_values needs positive_values"),
    ({"column": "x", "positive_values": ["1", "2"], "negative_values": ["2"]}, r"both positive and negative: \['2'\]"),
])
def test_bad_negative_value_declarations(task, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec.model_validate(task)
