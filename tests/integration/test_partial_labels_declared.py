"""A user's own dataset with a mostly-empty label column (issue 24), declared in a params file's ``datasets:``
section exactly as params.yaml's commented ``my-shop`` example shows, then run through the real ``emm`` CLI:
ingest -> pretrain -> decompose -> fuse -> evaluate. No code knows this dataset: it must ingest, train and fuse
on the declaration alone.

What must hold: every command exits 0; the scarce task (``buy``, empty on ~80% of rows, declared
``missing_values: [""]``) becomes nulls, and its pool member trains on only the rows that carry its label (its
entry.json and pool.json say how many); evaluate writes a finite fused − donor stack (and CI) for both tasks and
its report leads with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from emm.data.schema import Schema

DATASET = "my-shop"
# the my-shop declaration of params.yaml, with a `val` split carved from the test file as the example does
DECLARATION = {
    "format": "csv", "header": True,
    "files": {"train": "train.csv", "test": "test.csv"},
    "carve": {"source": "test", "into": ["val", "test"], "fraction": 0.5, "stratify": "click"},
    "dense": ["price", "age"], "sparse": "rest", "drop": ["row_id"], "dense_buckets": 8,
    "tasks": {"click": {"column": "clicked", "threshold": 0.5},
              "buy": {"column": "outcome", "positive_values": ["purchase"], "missing_values": [""]}},
    "default_tasks": ["click", "buy"],
}
# one member per task, params/tiny.yaml's shapes; the same spine so decompose finds shared layers
POOL = [
    {"name": "click-mlp", "task": "click", "arch": "mlp", "hidden": [16, 8, 4]},
    {"name": "buy-mlp", "task": "buy", "arch": "mlp", "hidden": [16, 8, 4]},
]
TRAIN = {"lr": 0.01, "batch_size": 256, "max_epochs": 2, "patience": 2, "seed": 2026, "device": "cpu"}
LABELLED_SHARE = 0.2  # of rows whose `outcome` cell is filled


def shop_frame(n: int, seed: int) -> pd.DataFrame:
    """A click label on every row; an outcome (purchase/browse) on ~20% of rows, empty elsewhere."""
    rng = np.random.default_rng(seed)
    price, age = rng.gamma(2.0, 20.0, n), rng.integers(18, 80, n)
    category = rng.choice(["shoes", "books", "toys", "food", "garden"], n)
    interest = -0.02 * price + 0.5 * (category == "toys") + rng.normal(size=n)
    clicked = (interest + rng.normal(size=n) > -0.5).astype(int)
    outcome = np.where(interest + 0.02 * (age - 45) + rng.normal(size=n) > 0, "purchase", "browse").astype(object)
    outcome[rng.random(n) >= LABELLED_SHARE] = ""
    return pd.DataFrame({"row_id": np.arange(n), "price": price.round(2), "age": age, "category": category,
                         "device": rng.choice(["ios", "android", "web"], n), "clicked": clicked, "outcome": outcome})


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> dict:
    """The raw CSVs, a params file declaring them, and every stage run through `emm` (exit codes checked)."""
    root = tmp_path_factory.mktemp("declared-partial")
    raw = root / "raw"
    raw.mkdir()
    shop_frame(4000, 1).to_csv(raw / "train.csv", index=False)
    shop_frame(2000, 2).to_csv(raw / "test.csv", index=False)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "paths": {"raw_root": str(root / "data"), "artifacts": str(root / "artifacts")},
        "datasets": {DATASET: DECLARATION},
        "pretrain": {"train": TRAIN, "pool": {DATASET: POOL}},
        "decompose": {"example_rows": 64},
        "tracking": {"store": str(root / "mlruns"), "log_models": False},
        "fuse": {"tower": [4], "train": TRAIN},
    }))
    mp = pytest.MonkeyPatch()
    mp.setattr("emm.cli.console", Console(width=300))  # tables unwrapped, into CliRunner's stdout
    from emm.cli import app

    outputs = {}
    try:
        for step, *args in (("ingest", "--raw-dir", str(raw)), ("pretrain", "--no-track"), ("decompose",),
                            ("fuse", "--no-track"), ("evaluate", "--no-register")):
            result = CliRunner().invoke(app, [step, DATASET, *args, "--params", str(params)])
            assert result.exit_code == 0, f"emm {step} failed:\n{result.output}"
            outputs[step] = result.output
    finally:
        mp.undo()
    art = root / "artifacts" / DATASET
    return {"raw": raw, "art": art, "schema": Schema.load(art / "data"), "outputs": outputs,
            "metrics": json.loads((art / "eval" / "metrics.json").read_text())}


def test_the_empty_cells_are_missing_labels_not_negatives(shop) -> None:
    schema = shop["schema"]
    assert schema.task_names == ["click", "buy"]
    assert schema.encoding["label_fraction"] == {}  # the gaps come from the data, not from an experiment knob
    train = pd.read_csv(shop["raw"] / "train.csv", keep_default_na=False, dtype=str)
    filled = int((train["outcome"] != "").sum())
    assert schema.labelled_rows("buy", "train") == filled < 0.3 * schema.rows["train"]
    assert schema.labelled_rows("buy", "train") > 0.1 * schema.rows["train"]
    for split in ("train", "val", "test"):
        assert 0 < schema.labelled_rows("buy", split) < schema.rows[split]
        assert schema.labelled_rows("click", split) == schema.rows[split]


def test_each_member_trained_on_its_task_labelled_rows(shop) -> None:
    schema, art = shop["schema"], shop["art"]
    pool = json.loads((art / "pool" / "pool.json").read_text())
    assert [m["name"] for m in pool["models"]] == [m["name"] for m in POOL]
    for member in POOL:
        record = json.loads((art / "pool-work" / member["name"] / "entry.json").read_text())["labelled"]
        expected = {s: schema.labelled_rows(member["task"], s) for s in ("train", "val", "test")}
        assert record == expected == pool["labelled_rows"][member["name"]]
    assert pool["labelled_rows"]["buy-mlp"]["train"] < schema.rows["train"]
    assert pool["labelled_rows"]["click-mlp"] == schema.rows
    for entry in pool["models"]:
        assert math.isfinite(entry["val_auc"]) and math.isfinite(entry["test_auc"]), entry["name"]


def test_evaluate_writes_a_finite_fused_minus_stack_for_both_tasks(shop) -> None:
    schema, metrics = shop["schema"], shop["metrics"]
    assert set(metrics["fused_minus_stack"]) == {"click", "buy"}
    for task, head in metrics["fused_minus_stack"].items():
        values = (head["diff"], head["low"], head["high"])
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), (task, head)
        assert head["low"] <= head["diff"] <= head["high"]
        assert metrics["tasks"][task]["labelled_test_rows"] == schema.labelled_rows(task, "test")
        assert math.isfinite(metrics["tasks"][task]["auc"]) and math.isfinite(metrics["tasks"][task]["donor_stack_auc"])
    assert metrics["tasks"]["buy"]["labelled_test_rows"] < metrics["rows_test"]


def test_the_evaluate_report_leads_with_fused_minus_stack(shop) -> None:
    lines = [x.strip() for x in shop["outputs"]["evaluate"].splitlines() if x.strip()]
    assert lines[0].startswith(f"{DATASET}: what fusion added over the donor stack")
    assert lines[1].startswith("click: EMM − donor stack") and lines[2].startswith("buy: EMM − donor stack")
    head = shop["metrics"]["fused_minus_stack"]["buy"]
    assert f"[{head['low']:+.5f}, {head['high']:+.5f}]" in lines[2]
    output = shop["outputs"]["evaluate"]
    assert output.index("EMM − donor stack") < output.index("Gain vs pool mean")
