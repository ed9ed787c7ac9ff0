"""Shared fixtures: real raw data from ../shared/data (never downloaded), sliced small for the fast tier."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest

from emm.runtime import set_quiet_env

REPO = Path(__file__).resolve().parents[1]
set_quiet_env(REPO)


def shared_data_dir() -> Path:
    """The raw datasets beside the checkout (CI puts ../shared there); EMM_SHARED_DATA overrides."""
    return Path(os.environ.get("EMM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "census-income").is_dir():
        pytest.fail(f"real raw data not found at {path}: CI expects ../shared/data beside the checkout "
                    f"(or set EMM_SHARED_DATA)")
    return path


def write_head(src: Path, dst: Path, rows: int, header: bool = False) -> None:
    """First `rows` data rows of a (gzipped) text file, written gzipped when dst ends in .gz."""
    opener_in = gzip.open if src.suffix == ".gz" else open
    opener_out = gzip.open if dst.suffix == ".gz" else open
    with opener_in(src, "rt") as fin, opener_out(dst, "wt") as fout:
        for i, line in enumerate(fin):
            if i >= rows + (1 if header else 0):
                break
            fout.write(line)


@pytest.fixture(scope="session")
def census_small_raw(tmp_path_factory, shared_data) -> Path:
    """A real Census-Income slice: the first 6,000 train rows and 3,000 test rows, gzipped like the originals."""
    folder = tmp_path_factory.mktemp("census-raw")
    src = shared_data / "census-income"
    write_head(src / "census-income.data.gz", folder / "census-income.data.gz", 6000)
    write_head(src / "census-income.test.gz", folder / "census-income.test.gz", 3000)
    return folder


@pytest.fixture(scope="session")
def census_small_data(tmp_path_factory, census_small_raw) -> Path:
    """The slice above, ingested with the default tasks (income, marital)."""
    from emm.pipeline.params import IngestConfig
    from emm.data.ingest import ingest
    from emm.data.spec import resolve_dataset

    out = tmp_path_factory.mktemp("census-data") / "data"
    ingest(resolve_dataset("census-income"), census_small_raw, out, IngestConfig())
    return out


@pytest.fixture
def copy_raw(tmp_path):
    """Copy a raw folder somewhere writable so a test can damage it."""

    def _copy(src: Path) -> Path:
        dst = tmp_path / "raw"
        shutil.copytree(src, dst)
        for p in dst.iterdir():
            p.chmod(0o644)
        return dst

    return _copy


@pytest.fixture(scope="session")
def census_three_task_schema(tmp_path_factory, census_small_raw):
    """The same slice ingested with a third task (sex): another schema, for 'trained on other data' checks."""
    from emm.pipeline.params import IngestConfig
    from emm.data.ingest import ingest
    from emm.data.spec import resolve_dataset

    out = tmp_path_factory.mktemp("census-three") / "data"
    return ingest(resolve_dataset("census-income"), census_small_raw, out, IngestConfig(),
                  tasks=["income", "marital", "sex"])
