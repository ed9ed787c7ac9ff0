"""Tree members fused end to end (issue 26): a pool of one network per task and a built-in LightGBM for marital goes
through `emm pretrain`, `emm decompose`, `emm fuse` and `emm export` on the Census slice. The tree's logit enters
marital's blend (weighted, and its scores move without it), the fused model saved with the tree's native file
reloads strictly and scores the same (from fused/ and from a registered-style bundle, torch alone), the ONNX file
agrees with torch, and a changed tree file is refused with the file named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import yaml
from typer.testing import CliRunner

from emm.cli import app
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.fusion.saved import FUSED_JSON, load_fused
from emm.io import read_json, sha256_file, write_json
from emm.models.pool import pool_digest, read_pool
from emm.models.tree_onnx import DESCRIPTION as TREES_AS
from emm.models.trees import TreeModel
from emm.pipeline.decompose import fused_pool
from emm.tracking.pyfunc import Scorer, write_bundle
from emm.train.metrics import auc
from tests.integration.test_pool_trees import DATASET, NETS, TINY, pool_dir, project

TREE = {"name": "marital-lgbm", "task": "marital", "arch": "lightgbm", "rounds": 30, "early_stop": 5, "num_leaves": 15}


def stage(name: str, params, *extra: str) -> None:
    result = CliRunner().invoke(app, [name, DATASET, "--params", str(params), *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def fused_project(census_small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse-trees")
    params = project(root, census_small_data, [*NETS, TREE])
    config = yaml.safe_load(params.read_text())
    config["fuse"] = {"output": "donor_residual", "tower": [4], "train": TINY}
    params.write_text(yaml.safe_dump(config))
    stage("pretrain", params, "--no-track")
    stage("decompose", params)
    stage("fuse", params, "--no-track")
    return params


def art(params):
    return params.parent / "artifacts" / DATASET


def test_the_trees_logit_enters_its_tasks_blend(fused_project, census_small_data):
    meta = read_json(art(fused_project) / "fused" / FUSED_JSON)
    pool = {e.name: e for e in read_pool(pool_dir(fused_project))}
    tree = pool["marital-lgbm"]
    assert tree.test_auc > pool["marital-mlp"].test_auc  # it helps: its weight in the stack is not 0
    assert meta["blend_init"]["marital"]["marital-lgbm"] != 0 and "marital-lgbm" not in meta["blend_init"]["income"]
    [member] = meta["architecture"]["fused"]["output_members"]
    assert (member["name"], member["task"], member["format"], member["sha256"]) == \
        ("marital-lgbm", "marital", "lightgbm", tree.weights_sha256)
    assert "marital-lgbm" not in meta["architecture"]["fused"].get("pruned", {}).get("donors_off", [])
    assert sha256_file(art(fused_project) / "fused" / member["file"]) == tree.weights_sha256
    entries = read_pool(pool_dir(fused_project))  # the digest covers the networks and the tree
    assert meta["made_from"]["pool"] == fused_pool(entries) != pool_digest([e for e in entries if e.name != tree.name])

    schema = Schema.load(census_small_data)
    model, _ = load_fused(art(fused_project) / "fused", schema)
    test = load_split(census_small_data, "test", schema)
    m = schema.task_names.index("marital")
    with torch.no_grad():
        before = model(test.sparse, test.dense)
        column = model.donor_names.index("marital-lgbm")
        model.blend.weight[:, column] = 0.0  # the tree left out of the blend
        after = model(test.sparse, test.dense)
    assert not torch.allclose(before[:, m], after[:, m])
    assert torch.equal(before[:, 1 - m], after[:, 1 - m])


def test_evaluate_takes_the_fused_model_of_a_pool_with_a_tree(fused_project):
    """It checks that the fused model was made from this pool, trees included (it refused it before)."""
    stage("evaluate", fused_project, "--no-register")
    metrics = read_json(art(fused_project) / "eval" / "metrics.json")
    assert set(metrics["tasks"]) == {"income", "marital"}
    assert "marital-lgbm" in json.dumps(metrics)  # the tree is one of the rows EMM is compared with


def test_saved_and_bundled_it_scores_as_fused(fused_project, census_small_data, tmp_path):
    schema = Schema.load(census_small_data)
    fused_dir = art(fused_project) / "fused"
    model, meta = load_fused(fused_dir, schema)
    test = load_split(census_small_data, "test", schema)
    with torch.no_grad():
        probs = torch.sigmoid(model(test.sparse, test.dense)).numpy()
    for t, task in enumerate(schema.task_names):  # the scores fuse reported, from the model as trained
        labelled = ~np.isnan(test.labels[:, t].numpy())
        assert abs(auc(test.labels[labelled, t].numpy(), probs[labelled, t]) - meta["test"][task]["auc"]) < 1e-6
    bundle = tmp_path / "bundle"  # what `emm evaluate` registers: fused.json's architecture + the weights
    write_bundle(bundle, builder="emm.fusion.saved:build_from_config", config=meta["architecture"],
                 outputs=meta["tasks"], weights=fused_dir / "fused.safetensors", data_dir=census_small_data)
    scorer = Scorer(bundle)
    assert isinstance(scorer.model.donors.trees[0], TreeModel)  # rebuilt from its layout: torch alone can score it
    for tree in (scorer.model.donors.trees[0], model.donors.trees[0]):  # the checked file, scored by LightGBM here
        assert tree.native is not None and tree.native.available
    with torch.no_grad():
        assert torch.equal(scorer.model(test.sparse, test.dense), model(test.sparse, test.dense))
    [member] = meta["architecture"]["fused"]["output_members"]
    tree_file = bundle / member["file"]  # the bundle carries the tree's native file, and checks it on load
    assert sha256_file(tree_file) == member["sha256"]
    tree_file.write_bytes(tree_file.read_bytes() + b"\n")
    with pytest.raises(EMMError, match=f"tree member 'marital-lgbm': its native file {tree_file}"):
        Scorer(bundle)


def test_the_fused_model_with_a_tree_exports_to_onnx(fused_project):
    members = read_json(art(fused_project) / "fused" / FUSED_JSON)["architecture"]["fused"]["output_members"]
    assert [m["name"] for m in members] == ["marital-lgbm"]  # the model exported runs the tree
    stage("export", fused_project, "--no-log")
    record = read_json(art(fused_project) / "export" / "export.json")
    assert record["check"]["bound_used"] <= 1 and record["check"]["rows"] > 100
    assert record["trees"] == {"members": ["marital-lgbm"], "as": TREES_AS}
    kinds = [n.op_type for n in onnx.load(str(art(fused_project) / "export" / "fused.onnx")).graph.node]
    assert kinds.count("TreeEnsemble") == 1  # the tree as onnxruntime's own node, not the walk traced


def test_a_changed_tree_file_is_refused_with_the_file_named(fused_project, census_small_data, tmp_path):
    schema = Schema.load(census_small_data)
    copy = tmp_path / "fused"
    shutil.copytree(art(fused_project) / "fused", copy)
    path = copy / "marital-lgbm.txt"
    lines = path.read_text().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if line.startswith("leaf_value="))
    first, rest = lines[i][len("leaf_value="):].split(" ", 1)
    at = first.index(".") + 2  # a digit that matters even in float32
    edited = first[:at] + ("1" if first[at] != "1" else "2") + first[at + 1:]
    lines[i] = f"leaf_value={edited} {rest}"  # of the same length: the header's tree_sizes still hold
    path.write_text("".join(lines))
    with pytest.raises(EMMError, match=rf"tree member 'marital-lgbm': its native file {path} has sha256 \w+, not the "):
        load_fused(copy, schema)
    meta = read_json(copy / FUSED_JSON)  # the digest edited to match: the tensors are not what the file gives
    meta["architecture"]["fused"]["output_members"][0]["sha256"] = sha256_file(path)
    write_json(copy / FUSED_JSON, meta)
    with pytest.raises(EMMError, match=r"tree member 'marital-lgbm': its tensors in fused.safetensors are not the ones "
                                       rf"its native file {path} gives"):
        load_fused(copy, schema)
    path.unlink()
    with pytest.raises(EMMError, match=rf"native file {path} is missing"):
        load_fused(copy, schema)
