"""Tree models as pool members, on the real Census slice: a LightGBM text file and an XGBoost JSON file trained
here, outside EMM, and a built-in LightGBM join a pool through `emm pretrain` and are listed by `emm pool list`;
their TreeModel logits are the libraries' own raw predictions; decomposition plans only the networks and names
the trees as output members; a wrong feature count, a pickle and a model of another encoding are refused with
the member named, before pool/ is written."""

from __future__ import annotations

import json
import pickle

import lightgbm as lgb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from rich.console import Console
from typer.testing import CliRunner

from emm.cli import app
from emm.data.batches import encoding_path, encoding_record, save_encoding
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.io import sha256_file, write_json
from emm.models.pool import load_pool, read_pool
from emm.models.trees import LightGBMSpec, TreeSpec, load_tree
from emm.pipeline.decompose import decompose_stage
from emm.pipeline.pretrain import pretrain_stage
from emm.train.lightgbm_row import lightgbm_features

xgb = pytest.importorskip("xgboost")  # pinned in the dev extra; the JSON itself is read without it

DATASET = "census-income"
TINY = {"batch_size": 512, "max_epochs": 1, "patience": 1, "lr": 0.005, "device": "cpu"}
NETS = [{"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [8]},
        {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [8]}]


def project(root, data_dir, pool: list[dict]):
    """A params.yaml whose artifacts folder holds a copy of the ingested slice."""
    import shutil

    shutil.copytree(data_dir, root / "artifacts" / DATASET / "data")
    params = {"paths": {"artifacts": str(root / "artifacts")}, "pretrain": {"train": TINY, "pool": {DATASET: pool}},
              "decompose": {"example_rows": 64}, "tracking": {"store": str(root / "mlruns"), "log_models": False}}
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def frame(data_dir, split: str):
    return pq.read_table(data_dir / f"{split}.parquet").to_pandas()


def all_features(schema: Schema) -> list[str]:
    return [f.name for f in schema.sparse] + [f.name for f in schema.dense]


@pytest.fixture(scope="module")
def outside(census_small_data, tmp_path_factory):
    """A LightGBM model (sparse features categorical, NaN in a dense column) and an XGBoost model, each trained
    on the ingested train rows with the libraries' own APIs and saved natively with the encoding record."""
    root = tmp_path_factory.mktemp("outside-trees")
    schema = Schema.load(census_small_data)
    train = frame(census_small_data, "train")
    train.loc[train.index[::4], "age"] = np.nan  # learnt missing-value branches, scored below on NaN rows
    categorical, features = lightgbm_features(schema)
    booster = lgb.train({"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 2, "seed": 1},
                        lgb.Dataset(train[features], train["marital"], categorical_feature=categorical), 30)
    booster.save_model(str(root / "marital.txt"))
    save_encoding(root / "marital.txt", census_small_data)
    names = all_features(schema)
    xbooster = xgb.train({"objective": "binary:logistic", "max_depth": 4, "nthread": 2, "seed": 1},
                         xgb.DMatrix(train[names], train["income"]), 30)
    xbooster.save_model(str(root / "income.json"))
    save_encoding(root / "income.json", census_small_data)
    return root


@pytest.fixture(scope="module")
def tree_project(outside, census_small_data, tmp_path_factory):
    """Two networks, the two outside files and a built-in LightGBM, through `emm pretrain`."""
    root = tmp_path_factory.mktemp("tree-project")
    pool = [*NETS, {"name": "income-lgbm", "task": "income", "arch": "lightgbm", "rounds": 30, "early_stop": 5,
                    "num_leaves": 15},
            {"name": "marital-lgbm", "task": "marital", "lightgbm": str(outside / "marital.txt")},
            {"name": "income-xgb", "task": "income", "xgboost": str(outside / "income.json")}]
    params = project(root, census_small_data, pool)
    result = CliRunner().invoke(app, ["pretrain", DATASET, "--params", str(params), "--no-track"])
    assert result.exit_code == 0, result.output
    return params


def pool_dir(params):
    return params.parent / "artifacts" / DATASET / "pool"


def test_tree_members_join_the_pool_with_their_files_and_are_listed(tree_project, outside, monkeypatch):
    entries = {e.name: e for e in read_pool(pool_dir(tree_project))}
    assert isinstance(entries["income-lgbm"].spec, LightGBMSpec) and entries["income-lgbm"].source == "builtin"
    assert entries["income-lgbm"].best_epoch >= 1  # boosting rounds kept by early stopping
    for name, fmt, suffix in [("marital-lgbm", "lightgbm", ".txt"), ("income-xgb", "xgboost", ".json")]:
        e = entries[name]
        assert isinstance(e.spec, TreeSpec) and e.spec.format == fmt and e.source == "file"
        assert e.weights == f"{name}{suffix}" and e.origin.encoding == "recorded"
        assert e.origin.source_sha256 == sha256_file(outside / f"{name.split('-')[0]}{suffix}")
    for e in entries.values():  # the native file in pool/, its digest recorded; AUCs as for any member
        assert e.weights_sha256 == sha256_file(pool_dir(tree_project) / e.weights)
        assert 0.5 < e.val_auc <= 1 and 0.5 < e.test_auc <= 1
    assert entries["marital-lgbm"].test_auc > entries["marital-mlp"].test_auc  # one epoch of a tiny MLP

    monkeypatch.setattr("emm.cli.console", Console(width=250))
    listing = CliRunner().invoke(app, ["pool", "list", DATASET, "--params", str(tree_project)])
    assert listing.exit_code == 0, listing.output
    for e in entries.values():
        assert e.name in listing.output and f"{e.test_auc:.5f}" in listing.output
    assert "builtin lightgbm" in listing.output and "file" in listing.output


@pytest.mark.parametrize("name", ["marital-lgbm", "income-xgb", "income-lgbm"])
def test_tree_model_logits_are_the_boosters_raw_predictions(tree_project, census_small_data, name):
    schema = Schema.load(census_small_data)
    test = load_split(census_small_data, "test", schema)
    sparse, dense = test.sparse, test.dense.clone()
    dense[::3, [f.name for f in schema.dense].index("age")] = float("nan")  # the learnt missing-value branches
    entry, model = next((e, m) for e, m in load_pool(pool_dir(tree_project), schema) if e.name == name)
    with torch.no_grad():  # the torch walk (a bundle scored without the library); model() itself calls the library
        ours = model.walk(model.inputs(sparse, dense))[:, 0].float().double().numpy()
    x = model.inputs(sparse, dense).double().numpy()
    path = pool_dir(tree_project) / entry.weights
    if name == "income-xgb":
        raw = xgb.Booster(model_file=str(path)).predict(xgb.DMatrix(x, feature_names=model.features),
                                                          output_margin=True)
        np.testing.assert_allclose(ours, raw, rtol=1e-5, atol=1e-5)  # XGBoost sums its leaves in float32
    else:
        raw = lgb.Booster(model_file=str(path)).predict(x, raw_score=True)
        np.testing.assert_allclose(ours, raw, rtol=0, atol=1e-5)
    assert np.isnan(x).any() and len(np.unique(ours)) > 100


def test_categorical_and_missing_rules_match_lightgbm_on_any_value(census_small_data, outside):
    """NaN, negative, fractional and unseen category codes, and NaN / zero in numeric columns (zero_as_missing)."""
    schema = Schema.load(census_small_data)
    categorical, features = lightgbm_features(schema)
    train = frame(census_small_data, "train")
    train.loc[train.index[::5], "weeks_worked"] = np.nan
    booster = lgb.train({"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 2, "seed": 2,
                         "zero_as_missing": True},
                        lgb.Dataset(train[features], train["income"], categorical_feature=categorical), 20)
    path = outside / "zero-missing.txt"
    booster.save_model(str(path))
    model = load_tree(path, "lightgbm", schema, "zero-missing")
    x = frame(census_small_data, "val")[features].to_numpy(np.float64)[:600]
    x[::3, 0], x[1::3, 1], x[2::3, 2], x[::4, 3] = np.nan, -1, 2.7, 1e9  # category columns
    x[::2, features.index("weeks_worked")] = np.nan
    x[1::2, features.index("age")] = 0.0
    with torch.no_grad():  # the walk on the booster's matrix as is
        ours = model.walk(torch.tensor(x, dtype=torch.float32)).float()
    np.testing.assert_allclose(ours[:, 0].double().numpy(), booster.predict(x, raw_score=True), rtol=0, atol=1e-5)


def test_decomposition_of_a_mixed_pool_plans_only_the_networks(tree_project):
    plan, entries = decompose_stage(DATASET, tree_project)
    assert plan.names == ["income-mlp", "marital-mlp"] and [e.name for e in entries] == plan.names
    saved = json.loads((tree_project.parent / "artifacts" / DATASET / "components" / "plan.json").read_text())
    assert saved["models"] == plan.names
    pool = {e.name: e for e in read_pool(pool_dir(tree_project))}
    assert saved["output_members"] == [
        {"name": n, "task": pool[n].task, "format": f, "weights_sha256": pool[n].weights_sha256}
        for n, f in [("income-lgbm", "lightgbm"), ("marital-lgbm", "lightgbm"), ("income-xgb", "xgboost")]]
    assert "at the output, not cut: income-lgbm (income, lightgbm)" in plan.report()


# ---- refusals: each names the member, and pool/ is not written ------------------------------------------------
def refused(tmp_path, data_dir, entry: dict, match: str) -> None:
    params = project(tmp_path, data_dir, [entry, *NETS])
    with pytest.raises(EMMError, match=match):
        pretrain_stage(DATASET, params, track=False, progress=False)
    assert not pool_dir(params).exists()


def test_a_wrong_feature_count_is_refused(census_small_data, tmp_path):
    schema = Schema.load(census_small_data)
    names = all_features(schema)[:-1]  # one column short, and no names in the file (a bare matrix)
    train = frame(census_small_data, "train")
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 2}, xgb.DMatrix(train[names].to_numpy(),
                                                                                       train["income"]), 3)
    booster.save_model(str(tmp_path / "short.json"))
    entry = {"name": "short-xgb", "task": "income", "xgboost": str(tmp_path / "short.json")}
    refused(tmp_path, census_small_data, entry,
            rf"pool model 'short-xgb' has {len(names)} unnamed feature columns, but 'census-income' gives a tree "
            rf"model {len(names) + 1}")


def test_a_model_that_reads_a_label_is_refused(census_small_data, tmp_path):
    schema = Schema.load(census_small_data)
    train = frame(census_small_data, "train")
    columns = [*all_features(schema), "marital"]  # another task's label as a feature
    lgb.train({"objective": "binary", "verbose": -1, "num_threads": 2}, lgb.Dataset(train[columns], train["income"]),
              3).save_model(str(tmp_path / "leak.txt"))
    refused(tmp_path, census_small_data, {"name": "leaky", "task": "income", "lightgbm": str(tmp_path / "leak.txt")},
            r"pool model 'leaky' reads feature\(s\) \['marital'\].*task labels")


@pytest.mark.parametrize("fmt", ["lightgbm", "xgboost"])
def test_a_pickled_model_file_is_refused(census_small_data, outside, tmp_path, fmt):
    source = outside / ("marital.txt" if fmt == "lightgbm" else "income.json")
    booster = lgb.Booster(model_file=str(source)) if fmt == "lightgbm" else xgb.Booster(model_file=str(source))
    path = tmp_path / ("model.txt" if fmt == "lightgbm" else "model.json")  # the suffix does not fool it
    path.write_bytes(pickle.dumps(booster))
    refused(tmp_path, census_small_data, {"name": "pickled", "task": "income", fmt: str(path)},
            rf"pool model 'pickled': .*model\.\w+ is a Python pickle .*, not a {fmt} model in its native format")


def test_a_model_trained_on_another_encoding_is_refused(census_small_data, census_three_task_schema, outside,
                                                        tmp_path):
    path = tmp_path / "other.txt"
    path.write_bytes((outside / "marital.txt").read_bytes())
    write_json(encoding_path(path), encoding_record(census_three_task_schema))  # recorded on the 3-task ingest
    refused(tmp_path, census_small_data, {"name": "other-lgbm", "task": "marital", "lightgbm": str(path)},
            r"pool model 'other-lgbm' was trained on another data encoding")
