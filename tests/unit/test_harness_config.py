"""The harness's settings (harness/benchmark.yaml), read beside emm's params.yaml: shared job stores must be
consistent, the repo's profiles are the ones the README runs, and emm's stages never see the section."""

from __future__ import annotations

import pytest
import yaml

from emm.errors import EMMError
from emm.pipeline.params import Params, load_params
from harness.params import DEFAULT_CONFIG, HarnessParams, load_harness_config, load_harness_params


@pytest.mark.parametrize("profiles, message", [
    ({"a": {}, "b": {"jobs_from": "c"}}, r"profile 'b': jobs_from 'c' must name another profile"),
    ({"a": {"jobs_from": "a"}}, r"profile 'a': jobs_from 'a' must name another profile"),
    ({"a": {}, "b": {"jobs_from": "a"}, "c": {"jobs_from": "b"}}, r"profile 'c': jobs_from 'b'"),
    ({"a": {"raw_rows": 100}, "b": {"jobs_from": "a"}}, r"raw_rows None differs from 'a''s 100"),
])
def test_a_shared_job_store_must_be_another_profiles_own_with_the_same_rows(tmp_path, profiles, message):
    """Profiles that share a job store build the same task-set data in it, so they must agree on the rows."""
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump({"benchmark": {"profile": "a", "profiles": profiles}}))
    with pytest.raises(EMMError, match=message):
        load_harness_config(path)


def test_the_repo_distill_profile_runs_in_the_full_profiles_store():
    bench = load_harness_config()
    assert bench.store("distill") == "full" and bench.store("full") == "full"
    assert bench.profiles["distill"].seeds == bench.profiles["full"].seeds


def test_the_repo_quick_profile_is_the_ci_sized_run_the_readme_promises():
    """`emm benchmark census-income --quick`: the first 20,000 raw rows, 1 seed, at most 4 epochs."""
    quick = load_harness_config(DEFAULT_CONFIG).pick("quick")
    assert (quick.raw_rows, quick.seeds, quick.max_epochs) == (20_000, [2026], 4)
    assert load_harness_config().profile == "full"


def test_the_harness_reads_emms_params_and_its_own_file_as_one(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ingest": {"block_mb": 4}}))
    config = tmp_path / "benchmark.yaml"
    config.write_text(yaml.safe_dump({"benchmark": {"workers": 3}}))
    cfg = load_harness_params(params, config)
    assert isinstance(cfg, HarnessParams) and isinstance(cfg, Params)
    assert cfg.ingest.block_mb == 4 and cfg.benchmark.workers == 3
    assert "benchmark" not in Params.model_fields and "benchmark" not in load_params("params.yaml").model_dump()


def test_typos_and_strays_in_the_harness_config_are_errors(tmp_path):
    config = tmp_path / "benchmark.yaml"
    config.write_text(yaml.safe_dump({"benchmark": {"workerz": 3}}))
    with pytest.raises(EMMError, match=r"(?s)harness config .* is invalid:.*workerz"):
        load_harness_config(config)
    config.write_text(yaml.safe_dump({"ingest": {"block_mb": 4}}))  # emm's sections belong in params.yaml
    with pytest.raises(EMMError, match=r"(?s)harness config .* is invalid:.*ingest"):
        load_harness_config(config)
    with pytest.raises(EMMError, match="does not exist"):
        load_harness_config(tmp_path / "nowhere.yaml")
