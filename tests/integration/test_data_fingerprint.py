"""The schema fingerprint changes whenever the encoding a model was trained on changes, and only then."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from emm.data.options import IngestConfig
from emm.data.encoding import Encoder
from emm.data.ingest import ingest
from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.errors import EMMError

NO_BUCKETS = resolve_dataset("census-income").model_copy(update={"dense_buckets": 0})
COLUMNS = NO_BUCKETS.columns


def rewrite_field(path: Path, column: str, edit) -> None:
    """Apply ``edit(line_no, value)`` to one column of every row of a gzipped Census file."""
    j = COLUMNS.index(column)
    with gzip.open(path, "rt") as fh:
        rows = [line.rstrip("\n").split(", ") for line in fh]
    for i, row in enumerate(rows):
        row[j] = edit(i + 1, row[j])
    with gzip.open(path, "wt") as fh:
        fh.writelines(", ".join(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, census_small_raw) -> Schema:
    """The Census slice without bucket features: the scaling is then visible only through min/max."""
    return ingest(NO_BUCKETS, census_small_raw, tmp_path_factory.mktemp("fp") / "data", IngestConfig())


def test_identical_ingests_have_identical_fingerprints(plain, census_small_raw, tmp_path):
    again = ingest(NO_BUCKETS, census_small_raw, tmp_path / "again", IngestConfig())
    assert again.fingerprint() == plain.fingerprint()
    assert Schema.load(tmp_path / "again").fingerprint() == plain.fingerprint()  # survives the JSON round trip


def test_changed_dense_max_changes_the_fingerprint(plain, copy_raw, census_small_raw, tmp_path):
    raw = copy_raw(census_small_raw)
    rewrite_field(raw / "census-income.data.gz", "wage_per_hour", lambda n, v: "99999" if n == 10 else v)
    other = ingest(NO_BUCKETS, raw, tmp_path / "out", IngestConfig())
    old = {d.name: d for d in plain.dense}["wage_per_hour"]
    assert {d.name: d for d in other.dense}["wage_per_hour"].max == 99999 != old.max
    assert [(f.name, f.vocab_size) for f in other.sparse] == [(f.name, f.vocab_size) for f in plain.sparse]
    assert other.fingerprint() != plain.fingerprint()


def test_renamed_category_changes_the_fingerprint(plain, copy_raw, census_small_raw, tmp_path):
    """Same vocabulary size, other contents: every index after the renamed value shifts."""
    raw = copy_raw(census_small_raw)
    for name in ("census-income.data.gz", "census-income.test.gz"):
        rewrite_field(raw / name, "race", lambda n, v: "Zzz" if v == "Black" else v)
    other = ingest(NO_BUCKETS, raw, tmp_path / "out", IngestConfig())
    assert [(f.name, f.vocab_size) for f in other.sparse] == [(f.name, f.vocab_size) for f in plain.sparse]
    assert other.fingerprint() != plain.fingerprint()


def test_vocabulary_file_from_another_ingest_is_refused(plain, copy_raw, census_small_raw, tmp_path):
    """schema.json and vocabulary.parquet of two ingests with equal vocabulary sizes do not mix."""
    import shutil

    raw = copy_raw(census_small_raw)
    for name in ("census-income.data.gz", "census-income.test.gz"):
        rewrite_field(raw / name, "race", lambda n, v: "Zzz" if v == "Black" else v)
    ingest(NO_BUCKETS, raw, tmp_path / "other", IngestConfig())
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    plain.save(mixed)
    shutil.copyfile(tmp_path / "other" / "vocabulary.parquet", mixed / "vocabulary.parquet")
    with pytest.raises(EMMError, match=r"vocabulary\.parquet: feature 'race' holds other values than schema\.json"):
        Encoder.load(mixed, plain)
