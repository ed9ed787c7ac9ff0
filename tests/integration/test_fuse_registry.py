"""Fuse -> evaluate -> register -> promote -> predict on real Census rows, with a real MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from emm.pipeline.params import DecomposeConfig, FuseConfig, PretrainConfig, TrackingConfig, TrainConfig
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.fusion.saved import FUSED_WEIGHTS, load_fused
from emm.io import sha256_file
from emm.pipeline.evaluate import evaluate
from emm.pipeline.fuse import fuse
from emm.pipeline.decompose import decompose_pool
from emm.pipeline.predict import predict_file
from emm.pipeline.register import promote
from emm.tracking.loading import load_scorer
from emm.tracking.pyfunc import raw_example
from emm.tracking import registry
from emm.tracking.registry import CHALLENGER, CHAMPION, SCORE_TAG
from emm.tracking.runs import open_run
from emm.tracking.store import configure
from emm.pipeline.pretrain import pretrain

POOL = [
    {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [32, 16, 8]},
    {"name": "income-dcn", "task": "income", "arch": "dcn", "hidden": [32, 16, 8]},
    {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [32, 16, 8]},
    {"name": "marital-res", "task": "marital", "arch": "resmlp", "hidden": [32, 16, 8]},
]
TRAIN = TrainConfig(batch_size=512, max_epochs=3, patience=3, lr=5e-3, device="cpu")


@pytest.fixture(scope="module")
def pipeline(census_small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = TrackingConfig(store=root / "mlruns", log_models=False)
    pretrain("census-income", census_small_data, root / "pool", root / "pool-work",
             PretrainConfig(train=TRAIN, pool={"census-income": POOL}), progress=False)
    decompose_pool(census_small_data, root / "pool", root / "components", DecomposeConfig())
    dirs = dict(data_dir=census_small_data, pool_dir=root / "pool", components_dir=root / "components")
    yield root, dirs, tracking
    mp.undo()


def run_fuse(pipeline, name: str, **cfg):
    root, dirs, tracking = pipeline
    fuse_cfg = FuseConfig(train=TRAIN, **cfg)
    with open_run("census-income", tracking.store, f"fused-{fuse_cfg.ablation}", tags={"emm.stage": "fuse"}) as tracker:
        fuse("census-income", dirs["data_dir"], dirs["pool_dir"], dirs["components_dir"], root / name,
             root / f"{name}-w", fuse_cfg, DecomposeConfig(), tracker=tracker, progress=False)
    return evaluate("census-income", dirs["data_dir"], dirs["pool_dir"], root / name, root / f"{name}-eval",
                    tracking=tracking)


def test_fused_model_trains_evaluates_and_registers(pipeline, census_small_data):
    root, dirs, tracking = pipeline
    summary = run_fuse(pipeline, "fused")
    assert set(summary["tasks"]) == {"income", "marital"}
    marital = summary["tasks"]["marital"]
    assert marital["auc"] > 0.9 and set(marital["pool"]) == {"marital-mlp", "marital-res"}
    assert marital["gain"] == pytest.approx(marital["auc"] - np.mean(list(marital["pool"].values())))
    metrics = json.loads((root / "fused-eval" / "metrics.json").read_text())
    assert metrics["registered_version"] == "1"
    assert (root / "fused-eval" / "plots" / "auc.png").stat().st_size > 1000
    # the saved model reproduces evaluate's AUC; the registered pyfunc reproduces the torch model
    schema = Schema.load(census_small_data)
    model, _ = load_fused(root / "fused", schema)
    configure(tracking.store)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("emm-census-income", CHALLENGER)
    assert str(version.version) == "1" and float(version.tags[SCORE_TAG]) == pytest.approx(summary["mean_test_auc"], abs=1e-6)
    scorer = mlflow.pyfunc.load_model("models:/emm-census-income@challenger")
    rows = raw_example(census_small_data, rows=40)
    scores = scorer.predict(rows)
    assert list(scores.columns) == ["score_income", "score_marital"]
    test = load_split(census_small_data, "test", schema).head(40)
    with torch.no_grad():
        expected = torch.sigmoid(model(test.sparse, test.dense)).numpy()
    np.testing.assert_allclose(scores.to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_promote_only_when_better(pipeline):
    root, _, tracking = pipeline
    promoted, reason = promote("census-income", tracking.store)
    assert promoted and "promoted version 1" in reason and "no champion" in reason
    second = run_fuse(pipeline, "fused-baseline", ablation="baseline")  # version 2, challenger
    client = mlflow.MlflowClient()
    v1 = float(client.get_model_version("emm-census-income", "1").tags[SCORE_TAG])
    v2 = float(client.get_model_version("emm-census-income", "2").tags[SCORE_TAG])
    assert v2 == pytest.approx(second["mean_test_auc"], abs=1e-6)
    promoted, reason = promote("census-income", tracking.store)
    champion = str(client.get_model_version_by_alias("emm-census-income", CHAMPION).version)
    assert promoted == (v2 > v1) and champion == ("2" if v2 > v1 else "1"), reason
    # a promotion done by hand (as in the MLflow UI) is honoured; promoting the other version back is
    # then again decided by the scores alone
    by_hand = "1" if champion == "2" else "2"
    client.set_registered_model_alias("emm-census-income", CHAMPION, by_hand)
    assert str(client.get_model_version_by_alias("emm-census-income", CHAMPION).version) == by_hand
    scores = {"1": v1, "2": v2}
    promoted, reason = promote("census-income", tracking.store, version=champion)
    assert promoted == (scores[champion] > scores[by_hand]), reason
    if not promoted:
        assert "does not beat champion" in reason
        assert str(client.get_model_version_by_alias("emm-census-income", CHAMPION).version) == by_hand


def test_predict_scores_good_rows_and_rejects_bad_ones(pipeline, census_small_data, tmp_path):
    root, _, tracking = pipeline
    configure(tracking.store)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("emm-census-income", CHAMPION, "1")
    scorer = load_scorer("models:/emm-census-income@champion", tracking.store)  # what `emm predict` loads
    rows = raw_example(census_small_data, rows=30).astype(str)
    rows.loc[3, "age"] = ""                      # missing value
    rows.loc[7, "wage_per_hour"] = "lots"        # not a number
    rows.loc[9, "education"] = "Never seen before"  # unseen category: scored via the reserved index
    src = tmp_path / "in.csv"
    rows.to_csv(src, index=False)
    report = predict_file(scorer, src, tmp_path / "out.csv")
    assert (report.scored, report.rejected) == (28, 2)
    out = pd.read_csv(tmp_path / "out.csv")
    assert list(out.columns) == ["row", "score_income", "score_marital"] and 10 in out["row"].tolist()
    assert out[["score_income", "score_marital"]].apply(lambda c: c.between(0, 1)).all().all()
    rejects = pd.read_csv(report.rejects)
    assert rejects["row"].tolist() == [4, 8]
    assert rejects["reason"].tolist() == ["missing value in 'age'", "'wage_per_hour' is not a number"]
    with pytest.raises(EMMError, match=r"input lacks required column\(s\) \['sex'\]"):
        predict_file(scorer, _without(rows, "sex", tmp_path), tmp_path / "out2.csv")
    assert not (tmp_path / "out2.csv").exists()


def _without(rows: pd.DataFrame, column: str, tmp_path):
    path = tmp_path / "missing-col.csv"
    rows.drop(columns=[column]).to_csv(path, index=False)
    return path


def test_fused_checkpoint_from_other_schema_refused(pipeline, census_three_task_schema):
    root, _, _ = pipeline
    with pytest.raises(EMMError, match=r"fused model in .* was trained on a different data schema"):
        load_fused(root / "fused", census_three_task_schema)


def test_evaluating_the_same_fused_model_again_reuses_its_version(pipeline):
    """`emm evaluate` run twice on one fused model: one version, challenger back on it, the summary says so."""
    root, dirs, tracking = pipeline
    configure(tracking.store)
    client = mlflow.MlflowClient()

    def versions() -> list[str]:
        return sorted(str(v.version) for v in client.search_model_versions("name = 'emm-census-income'"))

    def challenger() -> str:
        return str(client.get_model_version_by_alias("emm-census-income", CHALLENGER).version)

    assert versions() == ["1", "2"] and challenger() == "2"
    again = evaluate("census-income", dirs["data_dir"], dirs["pool_dir"], root / "fused",
                     root / "fused-eval-again", tracking=tracking)
    assert versions() == ["1", "2"], "evaluating the same fused model registered another version"
    assert again["registered_version"] == "1" and again["registered_reused"] is True
    assert challenger() == "1"
    assert client.get_model_version("emm-census-income", "1").tags[registry.DIGEST_TAG] == \
        sha256_file(root / "fused" / FUSED_WEIGHTS) == again["fused_sha256"]
    recorded = json.loads((root / "fused-eval-again" / "metrics.json").read_text())
    assert recorded["registered_version"] == "1" and recorded["registered_reused"] is True
