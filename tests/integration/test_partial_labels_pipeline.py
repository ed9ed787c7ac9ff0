"""The pipeline on partial labels (issue 24): Census ingested with ``ingest.label_fraction: {income: 0.2}``,
then pretrain -> decompose -> fuse -> `emm evaluate` through the stage functions and the CLI, as a user runs it.

What must hold: the income pool members train, early-stop and are scored on the ~20% of train/val rows that
carry an income label (their records say so, and their recorded AUCs are those of the labelled rows);
evaluate scores every income number on all test labels and fits the donor stack on the labelled val rows
only; the summary leads with fused − donor stack and its paired CI; no NaN reaches any output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from emm.data.options import ScaleConfig
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.fusion.saved import load_fused
from emm.models.pool import load_pool
from emm.models.single_task import ModelSpec
from emm.pipeline.decompose import decompose_stage
from emm.pipeline.fuse import fuse_stage
from emm.pipeline.ingest import ingest_stage
from emm.pipeline.params import load_params
from emm.pipeline.pretrain import pretrain_stage, train_pool_model

DATASET = "census-income"
FRACTION = 0.2
POOL = [
    {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16, 8]},
    {"name": "income-dcn", "task": "income", "arch": "dcn", "hidden": [16, 8], "cross_layers": 1},
    {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16, 8]},
]
TRAIN = {"device": "cpu", "batch_size": 256, "max_epochs": 4, "patience": 2, "lr": 2e-2, "seed": 3}


@pytest.fixture(scope="module")
def run(census_small_raw, tmp_path_factory) -> dict:
    """ingest (income labels thinned to 20% of train/val) -> pretrain -> decompose -> fuse -> `emm evaluate`."""
    root = tmp_path_factory.mktemp("partial-labels")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"artifacts": str(root / "artifacts")},
        "ingest": {"label_fraction": {"income": FRACTION}},
        "tracking": {"store": str(root / "mlruns"), "log_models": False},
        "pretrain": {"train": TRAIN, "pool": {DATASET: POOL}},
        "decompose": {"example_rows": 64},
        "fuse": {"tower": [4], "train": TRAIN},
    }))
    ingest_stage(DATASET, params, raw_dir=census_small_raw)
    pretrain_stage(DATASET, params, track=False, progress=False)
    decompose_stage(DATASET, params)
    fuse_stage(DATASET, params, track=False, progress=False)
    mp = pytest.MonkeyPatch()
    mp.setattr("emm.cli.console", Console(width=300))  # the table unwrapped, into CliRunner's stdout
    from emm.cli import app

    result = CliRunner().invoke(app, ["evaluate", DATASET, "--no-register", "--params", str(params)])
    mp.undo()
    assert result.exit_code == 0, result.output
    art = root / "artifacts" / DATASET
    return {"params": params, "art": art, "schema": Schema.load(art / "data"), "output": result.output,
            "metrics": json.loads((art / "eval" / "metrics.json").read_text())}


def _labelled(y: np.ndarray) -> np.ndarray:
    return ~np.isnan(y)


def _floats(obj, where: str = ""):
    """Every float in a JSON tree, with its path."""
    if isinstance(obj, float):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floats(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _floats(v, f"{where}[{i}]")


def test_income_members_train_on_its_labelled_rows_and_record_them(run) -> None:
    schema, art = run["schema"], run["art"]
    train = load_split(art / "data", "train", schema)
    i = schema.task_names.index("income")
    n_income = int(_labelled(train.labels[:, i].numpy()).sum())
    assert 0.15 * len(train) < n_income < 0.25 * len(train)  # the fraction took
    pool = json.loads((art / "pool" / "pool.json").read_text())
    for member in POOL:
        record = json.loads((art / "pool-work" / member["name"] / "entry.json").read_text())["labelled"]
        expected = {s: schema.labelled_rows(member["task"], s) for s in ("train", "val", "test")}
        assert record == expected == pool["labelled_rows"][member["name"]]
        if member["task"] == "income":
            assert record["train"] == n_income
            assert record["test"] == schema.rows["test"]  # test keeps every label
        else:
            assert record == {s: schema.rows[s] for s in ("train", "val", "test")}


def test_member_aucs_are_those_of_their_task_labelled_rows(run) -> None:
    schema, art = run["schema"], run["art"]
    entries = json.loads((art / "pool" / "pool.json").read_text())["models"]
    val = load_split(art / "data", "val", schema)
    assert np.isnan(val.labels.numpy()).any()  # some val rows lack an income label
    for (entry, model), raw in zip(load_pool(art / "pool", schema), entries):
        y = val.labels[:, schema.task_names.index(entry.task)].numpy()
        keep = _labelled(y)
        with torch.no_grad():
            probs = torch.sigmoid(model.eval()(val.sparse[keep], val.dense[keep]))[:, 0].numpy()
        assert raw["val_auc"] == pytest.approx(roc_auc_score(y[keep], probs), abs=1e-6), entry.name
        assert math.isfinite(raw["test_auc"]) and math.isfinite(raw["val_logloss"])


def test_evaluate_scores_income_on_all_test_labels_and_fits_the_stack_on_labelled_val_rows(run) -> None:
    schema, art, metrics = run["schema"], run["art"], run["metrics"]
    test, val = load_split(art / "data", "test", schema), load_split(art / "data", "val", schema)
    i = schema.task_names.index("income")
    y_test, y_val = test.labels[:, i].numpy(), val.labels[:, i].numpy()
    assert _labelled(y_test).all()
    row = metrics["tasks"]["income"]
    assert row["labelled_test_rows"] == len(test) == metrics["rows_test"]
    assert row["labelled_val_rows"] == schema.labelled_rows("income", "val") < len(val)
    model, _ = load_fused(art / "fused", schema)
    with torch.no_grad():
        fused = torch.sigmoid(model.eval()(test.sparse, test.dense))[:, i].numpy()
    assert row["auc"] == pytest.approx(roc_auc_score(y_test, fused), abs=1e-9)
    keep = _labelled(y_val)
    pool = [(e, m) for e, m in load_pool(art / "pool", schema) if e.task == "income"]
    with torch.no_grad():
        x_val = np.column_stack([m.eval()(val.sparse[keep], val.dense[keep])[:, 0].numpy() for _, m in pool])
        x_test = np.column_stack([m.eval()(test.sparse, test.dense)[:, 0].numpy() for _, m in pool])
    stacked = LogisticRegression(max_iter=1000).fit(x_val, y_val[keep]).decision_function(x_test)
    # a few hundred labelled rows: the fit moves a little with float noise in the logits (batched vs one pass)
    assert row["donor_stack_auc"] == pytest.approx(roc_auc_score(y_test, stacked), abs=1e-4)
    for name, value in row["pool"].items():
        assert math.isfinite(value), name


def test_the_summary_leads_with_fused_minus_stack_and_nothing_is_nan(run) -> None:
    metrics, output = run["metrics"], run["output"]
    assert list(metrics)[:2] == ["dataset", "fused_minus_stack"]
    for task, head in metrics["fused_minus_stack"].items():
        ci = metrics["tasks"][task]["ci"]["fused_minus_donor_stack"]
        assert (head["diff"], head["low"], head["high"]) == (ci["diff"], ci["low"], ci["high"])
        assert head["low"] <= head["diff"] <= head["high"]
        contains_zero = head["low"] <= 0 <= head["high"]
        assert (head["verdict"] == "no measurable gain") == contains_zero
        line = next(x for x in output.splitlines() if x.strip().startswith(f"{task}: EMM − donor stack"))
        assert f"[{head['low']:+.5f}, {head['high']:+.5f}]" in line
        assert ("no measurable gain (the CI contains 0)" in line) == contains_zero
    assert output.index("EMM − donor stack") < output.index("Gain vs pool mean")
    for path in ("eval/metrics.json", "eval/auc.json", "fused/fused.json", "pool/pool.json"):
        bad = [w for w, v in _floats(json.loads((run["art"] / path).read_text())) if not math.isfinite(v)]
        assert not bad, (path, bad)


def test_the_flow_report_leads_with_fused_minus_stack(run) -> None:
    from flows.full_pipeline import auc_markdown

    text = auc_markdown(DATASET, run["metrics"])
    assert text.index("EMM − donor stack") < text.index("Gain vs pool mean")
    assert "| income |" in text


def test_a_streamed_member_trains_on_the_labelled_rows_too(run, tmp_path: Path) -> None:
    schema, art = run["schema"], run["art"]
    cfg = load_params(run["params"]).pretrain
    spec = ModelSpec.model_validate(POOL[0])
    entry = train_pool_model(spec, art / "data", tmp_path, cfg, progress=False,
                             scale=ScaleConfig(stream="always", buffer_rows=1024))
    record = json.loads((tmp_path / spec.name / "entry.json").read_text())["labelled"]
    assert record["train"] == schema.labelled_rows("income", "train") < schema.rows["train"]
    assert math.isfinite(entry.val_auc) and math.isfinite(entry.test_auc)


def test_a_task_without_a_labelled_val_row_is_refused_with_its_name(run, tmp_path: Path) -> None:
    from emm.pipeline.pool_import import task_rows

    val = load_split(run["art"] / "data", "val", run["schema"])
    val.labels[:, run["schema"].task_names.index("income")] = float("nan")
    with pytest.raises(EMMError, match=r"task 'income' has no labelled row in split 'val'.*pool model 'x'"):
        task_rows(val, "income", "val", run["schema"], "pool model 'x'")


def test_pool_list_shows_the_rows_each_member_trained_on(run, monkeypatch) -> None:
    from emm.cli import app

    monkeypatch.setattr("emm.cli.console", Console(width=300))
    result = CliRunner().invoke(app, ["pool", "list", DATASET, "--params", str(run["params"])])
    assert result.exit_code == 0, result.output
    schema = run["schema"]
    assert "labelled train/val" in result.output
    income = next(line for line in result.output.splitlines() if "income-mlp" in line)
    assert f"{schema.labelled_rows('income', 'train'):,}/{schema.labelled_rows('income', 'val'):,}" in income
    marital = next(line for line in result.output.splitlines() if "marital-mlp" in line)
    assert f"{schema.rows['train']:,}/{schema.rows['val']:,}" in marital


def test_the_registered_version_and_its_run_carry_fused_minus_stack(run) -> None:
    """Last in this module: it registers (into this module's own MLflow store) and rewrites eval/."""
    import mlflow

    from emm.pipeline.evaluate import evaluate_stage
    from emm.tracking.registry import CHALLENGER
    from emm.tracking.store import configure

    summary = evaluate_stage(DATASET, run["params"], register=True)
    configure(load_params(run["params"]).tracking.store)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(f"emm-{DATASET}", CHALLENGER)
    assert str(version.version) == summary["registered_version"]
    run_tags = client.get_run(version.run_id).data.tags
    run_metrics = client.get_run(version.run_id).data.metrics
    for task, head in summary["fused_minus_stack"].items():
        for suffix, value in (("", head["diff"]), ("_ci_low", head["low"]), ("_ci_high", head["high"])):
            key = f"fused_minus_stack_{task}{suffix}"
            assert version.tags[key] == run_tags[key] == f"{value:.6f}"
            assert run_metrics[key] == pytest.approx(value)
        assert version.tags[f"fused_minus_stack_{task}_verdict"] == head["verdict"]
