"""Pretraining the pool on real Census rows: MLflow runs/metrics/models, pool.json, resume, schema checks."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from emm.pipeline.params import DecomposeConfig, PretrainConfig, TrackingConfig, TrainConfig
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.pipeline.decompose import decompose_pool, load_pool_plan
from emm.models.pool import load_pool, read_pool
from emm.pipeline.pool_specs import default_pool
from emm.pipeline.pretrain import pretrain
from emm.tracking.pyfunc import raw_example
from emm.tracking.runs import open_run

SMALL_POOL = [
    {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [32, 16, 8]},
    {"name": "income-dcn", "task": "income", "arch": "dcn", "hidden": [32, 16, 8]},
    {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [32, 16, 8]},
    {"name": "marital-res", "task": "marital", "arch": "resmlp", "hidden": [32, 16, 8]},
]
CFG = PretrainConfig(train=TrainConfig(batch_size=512, max_epochs=3, patience=3, lr=5e-3, device="cpu"),
                     pool={"census-income": SMALL_POOL})


@pytest.fixture(scope="module")
def trained(census_small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    tracking = TrackingConfig(store=root / "mlruns")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    with open_run("census-income", tracking.store, "pool", tags={"emm.stage": "pretrain"}) as tracker:
        entries = pretrain("census-income", census_small_data, root / "pool", root / "work", CFG, tracker=tracker,
                           progress=False)
    yield root, entries, tracking
    mp.undo()


def test_pool_json_and_weights(trained, census_small_data):
    root, entries, _ = trained
    assert [e.name for e in read_pool(root / "pool")] == [s["name"] for s in SMALL_POOL]
    schema = Schema.load(census_small_data)
    for entry, model in load_pool(root / "pool", schema):
        assert 0.5 < entry.test_auc <= 1.0 and entry.epochs_run == 3 and entry.mlflow_run_id
        test = load_split(census_small_data, "test", schema).select_tasks([entry.task])
        from emm.train.metrics import auc
        from emm.train.predict import predict_proba

        # the weights on disk reproduce the logged test AUC
        assert auc(test.labels.numpy()[:, 0], predict_proba(model, test)[:, 0]) == pytest.approx(entry.test_auc)


def test_mlflow_parent_child_runs_metrics_and_model(trained, census_small_data):
    root, entries, tracking = trained
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(root / 'mlruns' / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("emm-census-income")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "pool"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(s["name"] for s in SMALL_POOL)
    child = next(r for r in children if r.info.run_name == "income-dcn")
    assert child.data.params["arch"] == "dcn" and child.data.params["lr"] == "0.005"
    assert child.data.metrics["test_auc"] == pytest.approx(next(e.test_auc for e in entries if e.name == "income-dcn"))
    history = client.get_metric_history(child.info.run_id, "val_auc")
    assert [m.step for m in history] == [1, 2, 3]
    # the logged pyfunc rebuilds from spec + safetensors and scores raw rows like the torch model
    model_uri = f"runs:/{child.info.run_id}/model"
    mlflow.set_tracking_uri(client.tracking_uri)
    scorer = mlflow.pyfunc.load_model(model_uri)
    assert scorer.metadata.get_input_schema() is not None
    example = raw_example(census_small_data, rows=20)
    scores = scorer.predict(example)
    assert list(scores.columns) == ["score_income"]
    schema = Schema.load(census_small_data)
    torch_model = dict((e.name, m) for e, m in load_pool(root / "pool", schema))["income-dcn"]
    test = load_split(census_small_data, "test", schema).head(20)
    with torch.no_grad():
        expected = torch.sigmoid(torch_model(test.sparse, test.dense)).numpy()[:, 0]
    np.testing.assert_allclose(scores["score_income"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_resume_skips_finished_models(trained, census_small_data):
    root, entries, _ = trained
    again = pretrain("census-income", census_small_data, root / "pool2", root / "work", CFG, resume=True,
                     progress=False)
    assert [e.model_dump() for e in again] == [e.model_dump() for e in entries]


def test_pool_from_another_schema_is_refused(trained, census_three_task_schema):
    root, _, _ = trained
    with pytest.raises(EMMError, match=r"pool model 'income-mlp' was trained on a different data schema"):
        load_pool(root / "pool", census_three_task_schema)


def test_decompose_trained_pool_round_trip(trained, census_small_data, tmp_path):
    root, _, _ = trained
    plan, entries = decompose_pool(census_small_data, root / "pool", tmp_path / "components", DecomposeConfig())
    assert plan.num_levels == 4  # the embedding + the three spine blocks
    assert [lvl.out_shape for lvl in plan.levels][1:] == [(32,), (16,), (8,)]
    reloaded, _ = load_pool_plan(census_small_data, root / "pool", tmp_path / "components", DecomposeConfig())
    schema = Schema.load(census_small_data)
    x = load_split(census_small_data, "test", schema).head(300)
    for i, (entry, model) in enumerate(load_pool(root / "pool", schema)):
        h = reloaded.components[i][0](x.sparse, x.dense)
        for comp in reloaded.components[i][1:]:
            h = comp(h)
        assert torch.equal(reloaded.heads[i](h), model(x.sparse, x.dense)), entry.name


def test_default_pool_decomposes_exactly(census_small_data):
    """The shipped default pool (untrained): 2 models per task, all four structures across 3 tasks."""
    from emm.fusion import decompose
    from emm.models.single_task import ModelSpec, build_model

    schema = Schema.load(census_small_data)
    specs = [ModelSpec.model_validate(s) for s in default_pool(["income", "marital", "sex"])]
    assert {s.arch for s in specs} == {"mlp", "dcn", "resmlp"} and any(len(s.hidden) == 4 for s in specs)
    models = [build_model(s, schema).eval() for s in specs]
    x = load_split(census_small_data, "val", schema).head(128)
    plan = decompose(models, (x.sparse, x.dense), names=[s.name for s in specs], head="tower")
    assert plan.num_levels == 4
    for i, model in enumerate(models):
        assert torch.equal(plan.forward_model(i, x.sparse, x.dense), model(x.sparse, x.dense))
