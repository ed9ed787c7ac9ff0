"""Bring your own models, the worked example: two torch-rechub models trained in the test with their own
trainer (one factory + safetensors, one logged with mlflow.pytorch) join built-in ones in one pool, which
is imported, decomposed (the identical-layer refusal names align: project, which then works), fused,
evaluated, registered, scored by `emm predict`, and loaded by mlflow.pyfunc in a fresh process where
neither torch-rechub nor the user's module can be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from emm.cli import app
from emm.errors import EMMError
from emm.io import sha256_file
from emm.models.pool import PortableSpec, read_pool
from emm.pipeline.decompose import decompose_stage
from emm.pipeline.evaluate import evaluate_stage
from emm.pipeline.fuse import fuse_stage
from emm.pipeline.pretrain import pretrain_stage, task_model_name
from emm.tracking.pyfunc import raw_example
from emm.tracking.store import configure
from tests.conftest import REPO
from tests.integration.test_byom_support import USER_MODULE, project, set_align, trained_rechub, user_code  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # end to end: real training, DVC and Prefect runs


def mixed_pool(t) -> list[dict]:
    return [
        {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16]},
        {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16]},
        {"name": "income-dcnv2", "task": "income", "uri": t.dcnv2_uri, "trust_pickle": True, "inputs": "dict",
         "output": "probability"},
        {"name": "marital-dcn", "task": "marital", "factory": f"{USER_MODULE}:build", "kwargs": t.dcn_kwargs,
         "weights": str(t.dcn_weights), "inputs": "dict", "output": "probability"},
    ]


STANDALONE = textwrap.dedent("""
    import importlib.abc, json, sys
    class Refuse(importlib.abc.MetaPathFinder):  # the user's code is not installed here
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch_rechub", "{module}"):
                raise ImportError("not installed: " + name)
    sys.meta_path.insert(0, Refuse())
    import mlflow, pandas as pd
    from emm.tracking.store import configure
    configure(sys.argv[1])
    scores = mlflow.pyfunc.load_model(sys.argv[2]).predict(pd.read_csv(sys.argv[3], dtype=str))
    print(json.dumps({{"scores": scores.to_dict("list"),
                      "user_code_loaded": [m for m in sys.modules if m.startswith(("torch_rechub", "{module}"))]}}))
""")


def test_rechub_and_builtin_pool_fuse_register_and_score_standalone(trained_rechub, tmp_path):
    t = trained_rechub
    params = project(tmp_path, t.data_dir, mixed_pool(t), store=t.store, log_models=True)

    entries = pretrain_stage("census-income", params, progress=False)
    by_name = {e.name: e for e in entries}
    assert [e.source for e in entries] == ["builtin", "builtin", "mlflow", "factory"]
    pool_dir = tmp_path / "artifacts" / "census-income" / "pool"
    stored = {e.name: e for e in read_pool(pool_dir)}
    # imported, not retrained: EMM's AUC through the adapter is the model's own AUC on the same rows
    assert by_name["income-dcnv2"].val_auc == pytest.approx(t.own_val_auc["income"], abs=1e-6)
    assert by_name["marital-dcn"].val_auc == pytest.approx(t.own_val_auc["marital"], abs=1e-6)
    assert by_name["marital-dcn"].epochs_run == 0 and isinstance(stored["marital-dcn"].spec, PortableSpec)
    dcn, dcnv2 = stored["marital-dcn"].origin, stored["income-dcnv2"].origin
    assert dcn.factory == f"{USER_MODULE}:build" and dcn.source_sha256 == sha256_file(t.dcn_weights)
    assert dcn.encoding == "recorded" and dcnv2.encoding == "recorded"
    assert dcnv2.resolved_uri == "models:/rechub-income/1" and dcnv2.trust_pickle
    assert stored["marital-dcn"].weights_sha256 == sha256_file(pool_dir / "marital-dcn.safetensors")
    # provenance in the member's MLflow run; built-in members are versions of emm-<dataset>-<task>
    configure(t.store)
    client = mlflow.MlflowClient()
    run = client.get_run(by_name["income-dcnv2"].mlflow_run_id)
    assert run.data.params["resolved_uri"] == "models:/rechub-income/1" and run.data.tags["emm.source"] == "mlflow"
    versions = client.search_model_versions(f"name = '{task_model_name('census-income', 'income')}'")
    assert [v.tags["emm.member"] for v in versions] == ["income-mlp"]

    listing = CliRunner().invoke(app, ["pool", "list", "census-income", "--params", str(params)],
                                 env={"COLUMNS": "200"})
    assert listing.exit_code == 0, listing.output
    for name, source in [("income-mlp", "builtin mlp"), ("income-dcnv2", "mlflow models:/rechub-income/1"),
                         ("marital-dcn", f"factory {USER_MODULE}:build")]:
        assert name in listing.output and source in listing.output

    with pytest.raises(EMMError, match=r"share no identical layer.*marital-dcn.*decompose: \{align: project\}"):
        decompose_stage("census-income", params)  # the DCN shares no layer with the rest
    set_align(params, "project")
    plan, _ = decompose_stage("census-income", params)
    assert plan.names[-2:] == ["income-dcnv2", "marital-dcn"] and plan.num_levels == 2
    fused = fuse_stage("census-income", params, progress=False)
    summary = evaluate_stage("census-income", params)
    assert summary["tasks"]["marital"]["pool"]["marital-dcn"] == pytest.approx(by_name["marital-dcn"].test_auc)
    assert summary["tasks"]["income"]["auc"] == pytest.approx(fused.test["income"]["auc"], abs=1e-9)
    uri = f"models:/emm-census-income/{summary['registered_version']}"

    rows = raw_example(t.data_dir, rows=25)
    rows_csv = tmp_path / "rows.csv"
    rows.to_csv(rows_csv, index=False)
    out = tmp_path / "scores.csv"
    scored = CliRunner().invoke(app, ["predict", "--model-uri", uri, "--input", str(rows_csv), "--output", str(out),
                                      "--params", str(params)])
    assert scored.exit_code == 0, scored.output
    here = pd.read_csv(out)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(REPO)}
    code = STANDALONE.format(module=USER_MODULE)
    done = subprocess.run([sys.executable, "-c", code, str(t.store), uri, str(rows_csv)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh["user_code_loaded"] == []
    for task in ("income", "marital"):
        assert fresh["scores"][f"score_{task}"] == pytest.approx(here[f"score_{task}"].tolist(), abs=1e-6)


def test_registered_builtin_member_joins_another_pool_by_alias(census_small_data, tmp_path):
    """`emm pretrain` registers built-in members as versions of emm-<dataset>-<task>; a later pool names one
    by alias and gets it back rebuilt from its spec (no pickle, no retraining), and it fuses as a built-in."""
    store = tmp_path / "mlruns"
    first = project(tmp_path / "first", census_small_data,
                    [{"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16]},
                     {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16]}],
                    store=store, log_models=True)
    trained = {e.name: e for e in pretrain_stage("census-income", first, progress=False)}
    configure(store)
    client = mlflow.MlflowClient()
    name = task_model_name("census-income", "income")
    version = client.get_model_version(name, "1")
    assert version.tags["emm.member"] == "income-mlp"
    assert version.tags["test_auc"] == f"{trained['income-mlp'].test_auc:.6f}"
    client.set_registered_model_alias(name, "best", "1")

    second = project(tmp_path / "second", census_small_data,
                     [{"name": "income-registered", "task": "income", "uri": f"models:/{name}@best"},
                      {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16]}], store=store)
    entries = pretrain_stage("census-income", second, track=False, progress=False)
    got = entries[0]
    assert got.source == "mlflow" and got.origin.resolved_uri == f"models:/{name}/1" and got.epochs_run == 0
    assert got.spec.arch == "mlp" and got.test_auc == pytest.approx(trained["income-mlp"].test_auc, abs=1e-9)
    plan, _ = decompose_stage("census-income", second)  # a built-in architecture: identical layers as ever
    assert plan.align == "identical" and plan.num_levels >= 2
