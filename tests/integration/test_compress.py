"""``emm compress`` through the CLI, on the tiny registry the CLI built (``tiny_registry``: ingest -> pretrain ->
decompose -> fuse -> evaluate on a real Census slice, versions 1 and 2, ``@challenger`` on 2).

The compact model must be written (weights, ONNX file agreeing with torch, compact.json with its cost within the
budget and a paired CI per task against the fused model), registered as version 3 tagged ``compact`` with alias
``fast`` while ``challenger`` stays on the fused version, score raw rows through ``emm predict --model-uri
models:/emm-census-income@fast`` exactly as the compact model does, never be promoted to champion nor keep a fused
version from being promoted, reuse its version when the same weights are registered again, and, when it is not
within the bound, be left unregistered with the reason said (exit 0). The bound here is wide (``max_auc_loss: 1``):
whether a tiny compact model is within 0.0002 is not what is tested; the gate itself is (tests/unit/test_compact.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from emm.data.encoding import Encoder
from emm.data.schema import Schema
from emm.data.tensors import frame_to_tensors, load_split
from emm.io import read_json, sha256_file
from emm.pipeline.compress import COMPACT_JSON, COMPACT_ONNX, COMPACT_WEIGHTS
from emm.pipeline.export import LOGIT_ATOL, RTOL, onnx_logits, onnx_session
from emm.train.compact import build_from_config
from emm.train.predict import predict_proba
from emm.weights import load_module
from tests.conftest import write_head
from tests.integration.cli_here import run_cli
from tests.integration.test_mlflow_ui_promote import DATASET, MODEL, tiny_registry  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # end to end through the CLI on a registry the CLI built
BUDGET = 20_000
COMPRESS = {"flops_per_row": BUDGET, "max_auc_loss": 1.0, "numeric": {"mode": "minmax"},  # the tiny pool's encoding
            "train": {"lr": 0.01, "batch_size": 256, "max_epochs": 3, "patience": 2, "seed": 2026, "device": "cpu"}}


def cli(args: list[str], reg, expect: int) -> str:  # noqa: ANN001 - the Registry of the fixture
    """The real CLI in the registry's project; asserts the exit code and no traceback; stdout + stderr."""
    out = subprocess.run([str(Path(sys.executable).parent / "emm"), *args], cwd=reg.project, env=reg.env,
                         capture_output=True, text=True, timeout=300, check=False)
    said = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == expect, f"emm {' '.join(args)}: exit {out.returncode}:\n{said}"
    assert "Traceback" not in said, said
    return said


@pytest.fixture(scope="module")
def compressed(tiny_registry):  # noqa: F811 (fixture)
    reg = tiny_registry
    profile = yaml.safe_load(reg.params.read_text())
    profile["compress"] = COMPRESS
    params = reg.project / "compress.yaml"
    params.write_text(yaml.safe_dump(profile))
    said = run_cli(["compress", DATASET, "--params", str(params)], reg.project)  # in process: see cli_here.py
    art = reg.project / "artifacts" / "tiny" / DATASET
    client = mlflow.MlflowClient(tracking_uri=reg.uri, registry_uri=reg.uri)
    return SimpleNamespace(reg=reg, params=params, said=said, art=art, record=read_json(art / "compact" / COMPACT_JSON),
                           client=client)


def compact_model(art: Path, schema: Schema) -> torch.nn.Module:
    model = build_from_config(read_json(art / "compact" / COMPACT_JSON)["spec"], schema)
    load_module(model, art / "compact" / COMPACT_WEIGHTS, what="compact model")
    return model.eval()


def test_compress_writes_the_compact_model_and_registers_it_as_fast(compressed):
    c, record = compressed, compressed.record
    assert record["within"] and record["reasons"] == [] and record["registered_version"] == "3"
    assert "registered version 3 (alias fast): serve it as models:/emm-census-income@fast" in c.said, c.said
    assert record["cost"]["flops_per_row"] <= BUDGET == record["budget_flops_per_row"]
    assert record["cost"]["flops_per_row"] < record["fused_cost"]["flops_per_row"]
    assert record["made_from"]["fused_sha256"] == sha256_file(c.art / "fused" / "fused.safetensors")
    assert record["made_from"]["fused_version"] == "2"
    start = record["warm_start"]  # auto: a member of the hardest task that shares the compact model's embedding
    members = {m["name"]: m["task"] for m in read_json(c.art / "pool" / "pool.json")["models"]}
    hardest = min(record["tasks_compared"], key=lambda t: read_json(c.art / "fused" / "fused.json")["val"][t]["auc"])
    assert start["member"] in members and members[start["member"]] == hardest, (start, members)
    assert "bottom.blocks.0.0.weight" in start["copied"] and any(k.startswith("embedding.") for k in start["copied"])
    schema = Schema.load(c.reg.data_dir)
    test = load_split(c.reg.data_dir, "test", schema)
    for task, row in record["tasks_compared"].items():
        assert row["low"] <= row["diff"] <= row["high"] and row["labelled_test_rows"] == len(test), task
        assert row["diff"] == pytest.approx(row["compact_auc"] - row["fused_auc"])
        assert f"{task}: compact {row['compact_auc']:.5f} vs fused {row['fused_auc']:.5f}" in c.said

    version = c.client.get_model_version(MODEL, "3")
    assert version.tags["compact"] == "true" and version.tags["flops_per_row"] == str(record["cost"]["flops_per_row"])
    assert version.tags["compact_sha256"] == sha256_file(c.art / "compact" / COMPACT_WEIGHTS)
    assert "fused_sha256" not in version.tags  # evaluate must never take it for a fused model's version
    aliases = {a: str(v) for a, v in c.client.get_registered_model(MODEL).aliases.items()}
    assert aliases == {"fast": "3", "challenger": "2"}  # challenger stays on the fused model

    # the ONNX file scores as the compact model does, at any batch size
    assert record["onnx"]["check"]["bound_used"] <= 1
    model = compact_model(c.art, schema)
    with torch.no_grad():
        ref = model(test.sparse, test.dense).numpy().astype(np.float64)
    session = onnx_session(c.art / "compact" / COMPACT_ONNX, threads=1)
    for batch_size in (len(test), 7):
        got = onnx_logits(session, test.sparse.numpy(), test.dense.numpy(), batch_size).astype(np.float64)
        assert (np.abs(got - ref) <= LOGIT_ATOL + RTOL * np.abs(ref)).all()


def test_fast_scores_raw_rows_as_the_compact_model_does(compressed, tmp_path, census_small_raw):
    c = compressed
    rows = tmp_path / "rows.csv"
    write_head(census_small_raw / "census-income.test.gz", rows, 200)  # headerless raw UCI rows, as a user has them
    said = cli(["predict", "--model-uri", f"models:/{MODEL}@fast", "--input", str(rows), "--output",
                str(tmp_path / "fast.csv"), "--params", str(c.params)], c.reg, 0)
    assert "scored 200 rows" in said, said
    fast = pd.read_csv(tmp_path / "fast.csv")
    cli(["predict", "--model-uri", f"models:/{MODEL}@challenger", "--input", str(rows), "--output",
         str(tmp_path / "fused.csv"), "--params", str(c.params)], c.reg, 0)
    fused = pd.read_csv(tmp_path / "fused.csv")

    schema = Schema.load(c.reg.data_dir)
    encoder = Encoder.load(c.reg.data_dir, schema)
    raw = pd.read_csv(rows, header=None, dtype=str, keep_default_na=False, skipinitialspace=True)
    from emm.data.spec import resolve_dataset

    raw.columns = resolve_dataset(DATASET).columns
    tensors = frame_to_tensors(encoder.transform(raw, source="test rows", first_line=None), schema, with_labels=False)
    expected = predict_proba(compact_model(c.art, schema), tensors)
    scores = fast[["score_income", "score_marital"]].to_numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert np.abs(scores - fused[["score_income", "score_marital"]].to_numpy()).max() > 1e-4  # another model


def test_a_compact_version_is_never_promoted_nor_blocks_a_fused_one(compressed):
    c = compressed
    said = cli(["promote", DATASET, "--version", "3", "--params", str(c.params)], c.reg, 2)
    assert "version 3 of 'emm-census-income' is a compact model" in said and "@fast" in said, said
    said = cli(["promote", DATASET, "--params", str(c.params)], c.reg, 0)  # the challenger, fused version 2
    assert "promoted version 2" in said, said
    aliases = {a: str(v) for a, v in c.client.get_registered_model(MODEL).aliases.items()}
    assert aliases == {"fast": "3", "challenger": "2", "champion": "2"}


def test_registering_the_same_compact_weights_again_reuses_their_version(compressed, monkeypatch):
    from emm.pipeline.compress import register_compact
    from emm.pipeline.params import TrackingConfig

    c = compressed
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    again = register_compact(DATASET, c.reg.data_dir, c.art / "compact", c.record, TrackingConfig(store=c.reg.store))
    assert again["registered_version"] == "3" and again["registered_reused"]
    assert sorted(int(v.version) for v in c.client.search_model_versions(f"name = '{MODEL}'")) == [1, 2, 3]


def test_a_warm_start_member_not_in_the_pool_is_refused_and_compact_is_untouched(compressed):
    c = compressed
    profile = yaml.safe_load(c.params.read_text())
    profile["compress"]["warm_start"] = "no-such-member"
    params = c.reg.project / "compress-bad-start.yaml"
    params.write_text(yaml.safe_dump(profile))
    before = sha256_file(c.art / "compact" / COMPACT_WEIGHTS)
    said = cli(["compress", DATASET, "--params", str(params)], c.reg, expect=2)
    assert "compress.warm_start names 'no-such-member', which is not in the pool" in said, said
    assert "income-mlp" in said  # the members it could name
    assert sha256_file(c.art / "compact" / COMPACT_WEIGHTS) == before


def test_a_compact_model_outside_the_bound_is_not_registered(compressed, monkeypatch):
    """Last: it rewrites compact/. The bound cannot be missed on purpose with real scores, so the gate is
    asked with a bound no model meets (compact − fused >= +1)."""
    from rich.console import Console
    from typer.testing import CliRunner

    import emm.pipeline.compress as stage
    from emm.cli import app

    c = compressed
    real_gate = stage.gate
    monkeypatch.setattr(stage, "gate", lambda per_task, max_auc_loss: real_gate(per_task, -1.0))
    monkeypatch.setattr("emm.cli.console", Console(width=400))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(c.reg.project)
    result = CliRunner().invoke(app, ["compress", DATASET, "--params", str(c.params)])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "not registered: income: compact − fused" in said and "The fused model stays the one to serve" in said
    record = read_json(c.art / "compact" / COMPACT_JSON)
    assert not record["within"] and "registered_version" not in record and record["reasons"]
    assert sorted(int(v.version) for v in c.client.search_model_versions(f"name = '{MODEL}'")) == [1, 2, 3]
    assert str(c.client.get_model_version_by_alias(MODEL, "fast").version) == "3"
