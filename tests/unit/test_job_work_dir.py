"""A benchmark job removes and recreates only its own folder under ``<seed_dir>/work/``: its method name (a
pool model name, a baseline name, from the benchmark's config) is joined onto that folder, and a name with
``..`` in it used to send ``run_job``'s rmtree out of it."""

from __future__ import annotations

import pytest

from emm.errors import EMMError
from harness.experiments.jobs import Job, run_job


def job(tmp_path, method: str) -> Job:
    return Job(kind="baseline", method=method, seed=0, task_set="income", dataset="census-income",
               data_dir=str(tmp_path / "no-data"), seed_dir=str(tmp_path / "seed-0"))


def test_a_method_name_that_leaves_the_work_folder_removes_nothing(tmp_path):
    keep = tmp_path / "seed-0" / "outside" / "keep.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("another job's result")
    job(tmp_path, "x").work_dir.mkdir(parents=True)  # an earlier job's folder: the way out of work/
    bad = job(tmp_path, "x/../../outside")
    assert bad.work_dir.resolve() == keep.parent  # the folder the old rmtree removed
    with pytest.raises(Exception) as info:
        run_job(bad, "signature")
    assert keep.read_text() == "another job's result"
    assert isinstance(info.value, EMMError) and "outside" in str(info.value)
    assert str(tmp_path / "seed-0" / "work") in str(info.value)
