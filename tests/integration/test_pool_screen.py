"""A degenerate pool member (no better than chance) must not slip into ``pool/`` unnoticed, on real
Census rows: it is warned about, and ``pretrain.min_val_auc`` refuses it with pool/ left as it was."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import yaml

import emm.pipeline.pretrain as pretrain_module
from emm.errors import EMMError
from emm.models.pool import PoolEntry, read_pool
from emm.models.single_task import ModelSpec
from emm.pipeline.params import PretrainConfig, TrainConfig, load_params
from emm.pipeline.pretrain import assemble_pool_stage, pretrain, screen_members

POOL = [
    {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16, 8]},
    {"name": "income-const", "task": "income", "arch": "mlp", "hidden": [16, 8]},
    {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16, 8]},
]
TRAIN = TrainConfig(batch_size=512, max_epochs=2, patience=5, lr=5e-3, device="cpu")
CFG = PretrainConfig(train=TRAIN, pool={"census-income": POOL})


@pytest.fixture
def constant_member(monkeypatch):
    """``income-const`` trains as a real constant predictor: its last layer sees every row through zero
    weights and only the output bias learns, so every row gets the same score (AUC exactly 0.5)."""
    build = pretrain_module.build_model

    def build_model(spec, schema):
        model = build(spec, schema)
        if spec.name == "income-const":
            last = model.tower.net[-1]
            with torch.no_grad():
                last.weight.zero_()
            for p in model.parameters():
                p.requires_grad_(False)
            last.bias.requires_grad_(True)
        return model

    monkeypatch.setattr(pretrain_module, "build_model", build_model)


def test_degenerate_member_is_warned_about_then_refused(constant_member, census_small_data, tmp_path, caplog):
    pool, work = tmp_path / "pool", tmp_path / "work"
    with caplog.at_level("WARNING", logger="emm.pipeline.pretrain"):
        entries = pretrain("census-income", census_small_data, pool, work, CFG, progress=False)
    by_name = {e.name: e for e in entries}
    assert by_name["income-const"].val_auc == 0.5 and by_name["income-mlp"].val_auc > 0.6
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "no better than chance" in r.getMessage()]
    assert [r.getMessage().split(" has val AUC ")[0] for r in warned] == ["pool model 'income-const'"]
    assert "has val AUC 0.5: no better than chance" in warned[0].getMessage()
    assert [e.name for e in read_pool(pool)] == [m["name"] for m in POOL]  # off by default: warned, kept

    before = {p.name: p.read_bytes() for p in pool.iterdir()}
    strict = CFG.model_copy(update={"min_val_auc": 0.6})
    with pytest.raises(EMMError, match=r"pool model\(s\) 'income-const' \(val AUC 0\.5000\) are below "
                                       r"pretrain\.min_val_auc 0\.6; nothing was written to .*pool"):
        pretrain("census-income", census_small_data, pool, work, strict, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in pool.iterdir()} == before  # pool/ untouched
    assert not list(tmp_path.glob(".pool.tmp-*"))


def test_the_prefect_assemble_stage_refuses_too(census_small_data, tmp_path):
    """The flow's assemble step screens the members it is handed before writing pool/."""
    data = tmp_path / "artifacts" / "census-income" / "data"
    shutil.copytree(census_small_data, data)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": {"artifacts": str(tmp_path / "artifacts")},
                                      "pretrain": {"pool": {"census-income": POOL}, "min_val_auc": 0.55}}))
    entries = [_entry(m["name"], m["task"], 0.5 if m["name"] == "income-const" else 0.8).model_dump(mode="json")
               for m in POOL]
    with pytest.raises(EMMError, match=r"'income-const' \(val AUC 0\.5000\) are below pretrain\.min_val_auc 0\.55"):
        assemble_pool_stage("census-income", params, entries)
    assert not (tmp_path / "artifacts" / "census-income" / "pool").exists()


def _entry(name: str, task: str, val_auc: float) -> PoolEntry:
    spec = ModelSpec(name=name, task=task, arch="mlp", hidden=[16, 8])
    return PoolEntry(name=name, task=task, spec=spec, weights=f"{name}.safetensors", schema_fingerprint="x",
                     params=1, val_auc=val_auc, test_auc=val_auc, val_logloss=0.6, test_logloss=0.6, epochs_run=1,
                     best_epoch=1, seconds=0.0)


def test_nan_val_auc_is_warned_about_and_refused(tmp_path, caplog):
    entries = [_entry("a", "income", 0.8), _entry("b", "income", math.nan)]
    with caplog.at_level("WARNING", logger="emm.pipeline.pretrain"):
        screen_members(entries, CFG, tmp_path)
    assert "pool model 'b' has val AUC nan" in caplog.text and "'a'" not in caplog.text
    with pytest.raises(EMMError, match=r"'b' \(val AUC nan\) are below pretrain.min_val_auc 0.5"):
        screen_members(entries, CFG.model_copy(update={"min_val_auc": 0.5}), tmp_path)


def test_min_val_auc_out_of_range_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"pretrain": {"min_val_auc": 1.5}}))
    with pytest.raises(EMMError, match=r"params file .*params.yaml is invalid:(.|\n)*pretrain.min_val_auc\n"
                                       r"  Input should be less than or equal to 1"):
        load_params(params)
