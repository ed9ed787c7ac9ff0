"""A bad pool member name stops `emm pretrain` before anything is removed or written: the name used to be
joined onto pool-work/ and handed to rmtree, so an absolute name removed a folder outside the project, an
empty one removed every member's results and `../x` removed a sibling stage's folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from emm.cli import app
from emm.errors import EMMError
from emm.models.pool import PoolEntry
from emm.models.single_task import ModelSpec
from emm.pipeline.params import PretrainConfig
from emm.pipeline.pretrain import assemble_pool, pretrain_stage, train_pool_model
from tests.integration.test_byom_support import project

MARITAL = {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [4]}


def plant(tmp_path: Path, data_dir: Path, name: str) -> tuple[Path, dict[Path, str]]:
    """A project whose first pool entry is named ``name``, plus files a wrong rmtree would take with it:
    one outside the project, one in a sibling stage folder, one in the work folder of an earlier member."""
    params = project(tmp_path, data_dir, [{"name": name, "task": "income", "arch": "mlp", "hidden": [4]}, MARITAL],
                     store=tmp_path / "mlruns")
    stage = tmp_path / "artifacts" / "census-income"
    keep = {tmp_path / "outside" / "keep.txt": "outside the project",
            stage / "sentinel" / "keep.txt": "a sibling of the stage folders",
            stage / "pool-work" / "income-mlp" / "entry.json": '{"an earlier member": "finished"}'}
    for path, text in keep.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return params, keep


def name_for(tmp_path: Path, kind: str) -> str:
    return {"absolute": str(tmp_path / "outside"), "empty": "", "parent": "../sentinel"}[kind]


@pytest.mark.parametrize("kind", ["absolute", "empty", "parent"])
def test_a_bad_name_stops_pretrain_before_anything_is_removed(census_small_data, tmp_path, kind):
    name = name_for(tmp_path, kind)
    params, keep = plant(tmp_path, census_small_data, name)
    try:
        pretrain_stage("census-income", params, track=False, progress=False)
        message = "(no error)"
    except EMMError as exc:
        message = str(exc)
    assert {path: path.read_text() for path in keep if path.exists()} == keep  # checked first: nothing was lost
    assert "pretrain.pool.census-income[0]" in message and repr(name) in message
    assert not (tmp_path / "artifacts" / "census-income" / "pool").exists()
    assert sorted(p.name for p in (tmp_path / "artifacts" / "census-income" / "pool-work").iterdir()) == ["income-mlp"]


def test_the_cli_reports_the_bad_name_and_exits_non_zero(census_small_data, tmp_path):
    name = name_for(tmp_path, "absolute")
    params, keep = plant(tmp_path, census_small_data, name)
    result = CliRunner().invoke(app, ["pretrain", "census-income", "--no-track", "--params", str(params)])
    assert {path: path.read_text() for path in keep if path.exists()} == keep
    assert result.exit_code == 2
    assert "pretrain.pool.census-income[0]" in " ".join(result.output.split())  # rich may wrap the line
    assert result.exception is None or isinstance(result.exception, SystemExit)  # a message, not a traceback


def test_training_a_member_removes_only_inside_pool_work_even_past_the_name_check(census_small_data, tmp_path):
    """Names are checked when params.yaml is parsed; the stage's own removes and writes are guarded too, so
    a spec changed after that check (``model_copy``), or a record naming another file (next test),
    still cannot reach outside pool-work/ or pool/."""
    keep = tmp_path / "artifacts" / "sentinel" / "keep.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("a sibling of pool-work")
    work_dir = tmp_path / "artifacts" / "pool-work"
    work_dir.mkdir()  # as any earlier run leaves it (the way out of it, for `..`)
    spec = ModelSpec(name="m", task="income", arch="mlp", hidden=[4]).model_copy(update={"name": "../sentinel"})
    with pytest.raises(EMMError, match="outside"):
        try:
            train_pool_model(spec, census_small_data, work_dir, PretrainConfig(), progress=False)
        finally:
            assert [p.name for p in keep.parent.iterdir()] == ["keep.txt"]  # not removed, nothing written there


def test_assembling_the_pool_writes_only_inside_pool(tmp_path):
    work_dir = tmp_path / "artifacts" / "pool-work"
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"not read")
    entry = PoolEntry.model_construct(name="m", weights="../escaped.safetensors")
    with pytest.raises(EMMError, match="outside"):
        assemble_pool([entry], work_dir, tmp_path / "artifacts" / "pool", PretrainConfig(), sources={"m": weights})
    assert list((tmp_path / "artifacts").iterdir()) == []  # not pool/, not its temp folder, not escaped.safetensors
