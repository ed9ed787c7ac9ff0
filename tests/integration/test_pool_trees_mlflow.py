"""Tree members from MLflow (issue 26): a LightGBM booster logged with mlflow.lightgbm and an XGBoost booster logged
with mlflow.xgboost (its default UBJSON format), trained here outside EMM on the ingested slice, join a pool by
`models:/` URI through `emm pretrain`, score exactly as the native files they were logged from, record the
resolved URI and the downloaded file's sha256, are listed as `mlflow`, and the LightGBM one reaches the fused
model's blend. Refused with the member named: the scikit-learn wrapper (skops by default, or pickle) without
`trust_pickle` (accepted with it, its booster kept), a model with a wrong feature count, a model of neither
flavour; and a LightGBM file whose `tree_sizes=` no longer match its trees (CRLF line endings), which LightGBM's
reader would end the process on (tests/unit/test_lightgbm_text.py), is refused at `emm pretrain` naming the
member and the file."""

from __future__ import annotations

import lightgbm as lgb
import mlflow
import mlflow.lightgbm
import mlflow.xgboost
import numpy as np
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from emm.cli import app
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.io import read_json, sha256_file
from emm.models.pool import load_pool, read_pool
from emm.models.trees import TreeSpec, load_tree
from emm.pipeline.pretrain import pretrain_stage
from emm.tracking.external import log_encoding
from emm.tracking.store import configure
from emm.train.lightgbm_row import lightgbm_features
from tests.integration.test_pool_trees import DATASET, NETS, TINY, all_features, frame, outside, pool_dir, project
from tests.integration.test_pool_trees import refused as refused_file

xgb = pytest.importorskip("xgboost")
__all__ = ["outside"]  # the native files the logged models are made from (a fixture of this module too)


def log_tree(store, flavor, model, registered: str, data_dir, **kwargs) -> None:
    """Log ``model`` in its own run with the encoding it was trained on, registered as ``registered`` version 1."""
    configure(store)
    with mlflow.start_run():
        getattr(mlflow, flavor).log_model(model, name="model", registered_model_name=registered,
                                          pip_requirements=[flavor], **kwargs)
        log_encoding(data_dir)


@pytest.fixture(scope="module")
def store(outside, census_small_data, tmp_path_factory):
    """The outside files' boosters logged to a local MLflow store; the XGBoost one also under alias prod."""
    store = tmp_path_factory.mktemp("tree-mlflow") / "mlruns"
    log_tree(store, "lightgbm", lgb.Booster(model_file=str(outside / "marital.txt")), "marital-lgbm", census_small_data)
    log_tree(store, "xgboost", xgb.Booster(model_file=str(outside / "income.json")), "income-xgb", census_small_data)
    mlflow.MlflowClient().set_registered_model_alias("income-xgb", "prod", "1")
    return store


def uri_project(root, data_dir, store, pool: list[dict]):
    params = project(root, data_dir, pool)
    config = yaml.safe_load(params.read_text())
    config["tracking"]["store"] = str(store)
    config["fuse"] = {"output": "donor_residual", "tower": [4], "train": TINY}
    params.write_text(yaml.safe_dump(config))
    return params


@pytest.fixture(scope="module")
def mlflow_project(store, outside, census_small_data, tmp_path_factory):
    """Networks and the two logged trees by URI, through `emm pretrain`."""
    pool = [*NETS, {"name": "marital-lgbm", "task": "marital", "uri": "models:/marital-lgbm/1"},
            {"name": "income-xgb", "task": "income", "uri": "models:/income-xgb@prod"}]
    params = uri_project(tmp_path_factory.mktemp("tree-mlflow-project"), census_small_data, store, pool)
    result = CliRunner().invoke(app, ["pretrain", DATASET, "--params", str(params), "--no-track"])
    assert result.exit_code == 0, result.output
    return params


def test_logged_trees_join_the_pool_and_score_as_their_files(mlflow_project, census_small_data, store, outside,
                                                             tmp_path, monkeypatch):
    entries = {e.name: e for e in read_pool(pool_dir(mlflow_project))}
    schema = Schema.load(census_small_data)
    test = load_split(census_small_data, "test", schema)
    models = {e.name: m for e, m in load_pool(pool_dir(mlflow_project), schema)}
    configure(store)
    for name, fmt, suffix, file in [("marital-lgbm", "lightgbm", ".txt", "marital.txt"),
                                    ("income-xgb", "xgboost", ".json", "income.json")]:
        e = entries[name]
        assert e.source == "mlflow" and isinstance(e.spec, TreeSpec) and e.spec.format == fmt
        assert e.weights == f"{name}{suffix}" and e.weights_sha256 == sha256_file(pool_dir(mlflow_project) / e.weights)
        assert e.origin.resolved_uri == f"models:/{name}/1" and e.origin.encoding == "recorded"
        downloaded = mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / name))
        data = mlflow.models.Model.load(downloaded).flavors[fmt]["data"]
        assert e.origin.run_id == mlflow.MlflowClient().get_model_version(name, "1").run_id
        assert e.origin.source_sha256 == sha256_file(f"{downloaded}/{data}")
        native = load_tree(outside / file, fmt, schema, "native")  # the file it was logged from, read as a file member
        with torch.no_grad():
            assert torch.equal(models[name](test.sparse, test.dense), native(test.sparse, test.dense))
    lgbm, xgbm = entries["marital-lgbm"], entries["income-xgb"]
    assert lgbm.origin.source_sha256 == lgbm.weights_sha256  # model.lgb is LightGBM's text, kept as it is
    assert xgbm.origin.source_sha256 != xgbm.weights_sha256  # model.ubj, kept as XGBoost's JSON

    monkeypatch.setattr("emm.cli.console", Console(width=250))
    listing = CliRunner().invoke(app, ["pool", "list", DATASET, "--params", str(mlflow_project)])
    assert listing.exit_code == 0, listing.output
    assert "mlflow models:/marital-lgbm/1" in listing.output and "mlflow models:/income-xgb/1" in listing.output


def test_the_logged_tree_reaches_the_fused_blend(mlflow_project):
    for stage in ("decompose", "fuse"):
        extra = ["--no-track"] if stage == "fuse" else []
        result = CliRunner().invoke(app, [stage, DATASET, "--params", str(mlflow_project), *extra])
        assert result.exit_code == 0, result.output
    meta = read_json(mlflow_project.parent / "artifacts" / DATASET / "fused" / "fused.json")
    assert meta["blend_init"]["marital"]["marital-lgbm"] != 0
    members = {m["name"]: m for m in meta["architecture"]["fused"]["output_members"]}
    pool = {e.name: e for e in read_pool(pool_dir(mlflow_project))}
    assert members["marital-lgbm"]["sha256"] == pool["marital-lgbm"].weights_sha256


# ---- refusals: each names the member, and pool/ is not written ------------------------------------------------
def refused(tmp_path, data_dir, store, entry: dict, match: str) -> None:
    params = uri_project(tmp_path, data_dir, store, [entry, *NETS])
    with pytest.raises(EMMError, match=match):
        pretrain_stage(DATASET, params, track=False, progress=False)
    assert not pool_dir(params).exists()


@pytest.fixture(scope="module")
def sklearn_store(store, census_small_data):
    """An LGBMClassifier logged the way MLflow 3 does by default (skops) and as a pickle, on the same store."""
    schema = Schema.load(census_small_data)
    categorical, features = lightgbm_features(schema)
    train = frame(census_small_data, "train")
    clf = lgb.LGBMClassifier(n_estimators=10, num_leaves=7, verbose=-1, n_jobs=2)
    clf.fit(train[features], train["marital"], categorical_feature=categorical)
    log_tree(store, "lightgbm", clf, "marital-sk", census_small_data)
    log_tree(store, "lightgbm", clf, "marital-pk", census_small_data, serialization_format="pickle")
    return store, clf


@pytest.mark.parametrize("registered,stored", [("marital-sk", r"model\.skops \(skops\)"),
                                               ("marital-pk", r"model\.pkl \(pickle\)")])
def test_the_sklearn_wrapper_needs_trust_pickle(sklearn_store, census_small_data, tmp_path, registered, stored):
    store, _ = sklearn_store
    entry = {"name": "marital-sk", "task": "marital", "uri": f"models:/{registered}/1"}
    refused(tmp_path, census_small_data, store, entry,
            rf"pool model 'marital-sk': models:/{registered}/1 is a scikit-learn lightgbm.sklearn.LGBMClassifier "
            rf"stored as {stored}.*`trust_pickle: true`.*model\.booster_")


def test_the_sklearn_wrapper_with_trust_pickle_joins_as_its_booster(sklearn_store, census_small_data, tmp_path,
                                                                    caplog):
    store, clf = sklearn_store
    entry = {"name": "marital-sk", "task": "marital", "uri": "models:/marital-sk/1", "trust_pickle": True}
    params = uri_project(tmp_path, census_small_data, store, [entry])
    with caplog.at_level("WARNING"):
        [got] = pretrain_stage(DATASET, params, track=False, progress=False)
    assert "because the entry sets trust_pickle: true" in caplog.text
    assert got.source == "mlflow" and got.origin.trust_pickle and got.spec.format == "lightgbm"
    schema = Schema.load(census_small_data)
    [(_, model)] = load_pool(pool_dir(params), schema)
    test = load_split(census_small_data, "test", schema)
    x = model.inputs(test.sparse, test.dense).double().numpy()
    with torch.no_grad():
        ours = model(test.sparse, test.dense)[:, 0].double().numpy()
    np.testing.assert_allclose(ours, clf.booster_.predict(x, raw_score=True), rtol=0, atol=1e-5)


def test_a_wrong_feature_count_is_refused(store, census_small_data, tmp_path):
    names = all_features(Schema.load(census_small_data))[:-1]
    train = frame(census_small_data, "train")
    short = xgb.train({"objective": "binary:logistic", "max_depth": 2}, xgb.DMatrix(train[names].to_numpy(),
                                                                                   train["income"]), 3)
    log_tree(store, "xgboost", short, "short-xgb", census_small_data)
    refused(tmp_path, census_small_data, store, {"name": "short-xgb", "task": "income", "uri": "models:/short-xgb/1"},
            rf"pool model 'short-xgb' has {len(names)} unnamed feature columns")


def test_a_model_of_another_flavour_is_refused(store, census_small_data, tmp_path):
    import mlflow.sklearn
    from sklearn.dummy import DummyClassifier

    configure(store)
    with mlflow.start_run():
        mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], [0, 1]), name="model", registered_model_name="dummy",
                                 pip_requirements=["scikit-learn"])
    refused(tmp_path, census_small_data, store, {"name": "dummy", "task": "income", "uri": "models:/dummy/1"},
            r"pool model 'dummy': models:/dummy/1 is neither a PyTorch nor a LightGBM / XGBoost model \(flavors "
            r"\['python_function', 'sklearn'\]\)")


def test_a_damaged_lightgbm_file_is_refused_at_pretrain(outside, census_small_data, tmp_path):
    path = tmp_path / "crlf.txt"  # as git's core.autocrlf checks a text file out on Windows
    path.write_bytes((outside / "marital.txt").read_bytes().replace(b"\n", b"\r\n"))
    refused_file(tmp_path, census_small_data, {"name": "crlf-lgbm", "task": "marital", "lightgbm": str(path)},
                 rf"pool model 'crlf-lgbm' \({path}\): header tree_sizes= says tree 0 is .* CRLF line endings")
