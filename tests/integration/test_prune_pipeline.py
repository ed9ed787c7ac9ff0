"""The fuse stage saves the pruned fused model (issue 25) and everything downstream works with it, on real Census
rows: fuse -> fused.json (what was left out and why, the cost before and after) -> load_fused (strict) with the
scores of the model as trained -> the registered model's bundle (what the pyfunc, the REST server and `emm predict`
score with) -> `emm evaluate` (the cost in metrics.json) -> ONNX export -> `emm pool list`.

The fuse runs at a learning rate too small to move a logit, so the kept model is its step 0 (the donors' blend, every
residual exactly zero): the case early stopping leaves on Census with the default recipe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.fusion.saved import FUSED_JSON, load_fused
from emm.io import read_json
from emm.pipeline.decompose import decompose_stage
from emm.pipeline.evaluate import evaluate_stage
from emm.pipeline.export import export_stage
from emm.pipeline.fuse import fuse_stage
from emm.pipeline.pretrain import pretrain_stage
from emm.pipeline.register import FUSED_MODEL_BUILDER
from emm.tracking.pyfunc import Scorer, raw_example, write_bundle

DATASET = "census-income"
POOL = [{"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16, 8]},
        {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16, 8]}]
TRAIN = {"device": "cpu", "batch_size": 512, "max_epochs": 1, "patience": 2, "lr": 5e-3, "seed": 3}


@pytest.fixture(scope="module")
def run(census_small_data, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prune")
    art = root / "artifacts" / DATASET
    shutil.copytree(census_small_data, art / "data")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"artifacts": str(root / "artifacts")},
        "tracking": {"store": str(root / "mlruns"), "log_models": False},
        "pretrain": {"train": TRAIN, "pool": {DATASET: POOL}},
        "decompose": {"example_rows": 64},
        "fuse": {"tower": [4], "output": "donor_residual", "train": {**TRAIN, "lr": 1e-12}},
    }))
    pretrain_stage(DATASET, params, track=False, progress=False)
    decompose_stage(DATASET, params)
    result = fuse_stage(DATASET, params, track=False, progress=False)
    return {"params": params, "art": art, "result": result, "schema": Schema.load(art / "data")}


def test_the_saved_model_is_pruned_and_scores_as_the_trained_one(run) -> None:
    meta = read_json(run["art"] / "fused" / FUSED_JSON)
    pruned = meta["architecture"]["fused"]["pruned"]
    assert pruned["residual_off"] == ["income", "marital"] and "stack_off" in pruned["why"]
    cost = meta["cost"]
    assert cost["saved"]["flops_per_row"] < cost["unpruned"]["flops_per_row"] / 2
    assert cost["saved"]["parameters"] < cost["unpruned"]["parameters"]
    model, _ = load_fused(run["art"] / "fused", run["schema"])  # strict: every key the pruned model has, no other
    assert not any(k.startswith(("levels.", "embedding.", "towers.")) for k in model.state_dict())
    assert model.state_dict().keys() == run["result"].saved.state_dict().keys()
    test = load_split(run["art"] / "data", "test", run["schema"])
    trained = run["result"].model.cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(test.sparse, test.dense), trained(test.sparse, test.dense), rtol=0, atol=1e-6)


def test_the_registered_bundle_rebuilds_the_pruned_model(run, tmp_path) -> None:
    fused_dir, data_dir = run["art"] / "fused", run["art"] / "data"
    meta = read_json(fused_dir / FUSED_JSON)
    write_bundle(tmp_path / "bundle", builder=FUSED_MODEL_BUILDER, config=meta["architecture"], outputs=meta["tasks"],
                 weights=fused_dir / "fused.safetensors", data_dir=data_dir)
    scores = Scorer(tmp_path / "bundle").predict(raw_example(data_dir, rows=40)).to_numpy()
    test = load_split(data_dir, "test", run["schema"]).head(40)
    with torch.no_grad():
        expected = torch.sigmoid(run["result"].model.cpu().eval()(test.sparse, test.dense)).numpy()
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_evaluate_reports_the_cost_and_export_accepts_the_pruned_model(run) -> None:
    from emm.pipeline.evaluate import cost_line

    summary = evaluate_stage(DATASET, run["params"], register=False)
    cost = summary["cost"]
    meta = read_json(run["art"] / "fused" / FUSED_JSON)
    assert cost["flops_per_row"] == meta["cost"]["saved"]["flops_per_row"]
    assert cost["unpruned"] == meta["cost"]["unpruned"] and cost["pruned"]["residual_off"] == ["income", "marital"]
    assert read_json(run["art"] / "eval" / "metrics.json")["cost"] == cost
    line = cost_line(summary)
    assert f"{cost['flops_per_row']:,} FLOPs" in line and "residual_off income, marital" in line
    report = export_stage(DATASET, run["params"], log_model=False)
    assert report.max_abs_diff < 1e-4 and report.path.is_file()


def test_pool_list_shows_flops_per_row_of_every_member_and_the_fused_model(run, monkeypatch) -> None:
    from emm.cli import app

    monkeypatch.setattr("emm.cli.console", Console(width=300))
    result = CliRunner().invoke(app, ["pool", "list", DATASET, "--params", str(run["params"])])
    assert result.exit_code == 0, result.output
    assert "FLOPs/row" in result.output
    income = next(line for line in result.output.splitlines() if "income-mlp" in line)
    assert "?" not in income.split("│")[5]  # counted, not unknown
    saved = read_json(run["art"] / "fused" / FUSED_JSON)["cost"]["saved"]
    assert f"fused model: {saved['flops_per_row']:,} FLOPs per row" in result.output
