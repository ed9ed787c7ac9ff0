"""The pool on disk is checked at every stage that reads it, on real Census rows (issue 22, items 2, 4, 7):
swapped or edited weight files, a hand-edited pool.json, NaN weights or scores, components or a fused
model made from another pool are each refused with the member (or folder) named; evaluate reports the
donors' AUCs as it re-scores them, never pool.json's numbers.

One tiny pool (three small MLPs, one epoch) is built, decomposed, fused and evaluated once per module;
each test damages its own copy of the artifacts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.io import sha256_file
from emm.models.external import FactoryMember
from emm.models.pool import load_pool
from emm.pipeline.decompose import decompose_stage, load_pool_plan
from emm.pipeline.evaluate import evaluate_stage
from emm.pipeline.fuse import fuse_stage
from emm.pipeline.params import DecomposeConfig
from emm.pipeline.pool_import import CHECK_ROWS, import_member
from emm.pipeline.pretrain import pool_entries, pretrain_stage

DATASET = "census-income"
POOL = [  # income-a and income-b alike in shape (swapped files load without a shape error), not in weights
    {"name": "income-a", "task": "income", "arch": "mlp", "hidden": [8, 4]},
    {"name": "income-b", "task": "income", "arch": "mlp", "hidden": [8, 4], "dropout": 0.3},
    {"name": "marital-a", "task": "marital", "arch": "mlp", "hidden": [8, 4]},
]
TRAIN = {"device": "cpu", "batch_size": 512, "max_epochs": 1, "patience": 1, "lr": 5e-3}


def _write_params(root: Path) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({
        "paths": {"artifacts": str(root / "artifacts")},
        "tracking": {"store": str(root / "mlruns"), "log_models": False},
        "pretrain": {"train": {**TRAIN, "seed": 1}, "pool": {DATASET: POOL}},
        "decompose": {"example_rows": 64},
        "fuse": {"tower": [4], "train": TRAIN},
    }))
    return path


@pytest.fixture(scope="module")
def built(census_small_data, tmp_path_factory) -> Path:
    """pool/, components/, fused/ and eval/ as the stages write them, from one params.yaml."""
    root = tmp_path_factory.mktemp("integrity")
    shutil.copytree(census_small_data, root / "artifacts" / DATASET / "data")
    params = _write_params(root)
    pretrain_stage(DATASET, params, track=False, progress=False)
    decompose_stage(DATASET, params)
    fuse_stage(DATASET, params, track=False, progress=False)
    evaluate_stage(DATASET, params, register=False)
    return root


@pytest.fixture
def project(built: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(params.yaml, artifacts/census-income/) of a fresh copy this test may damage."""
    shutil.copytree(built / "artifacts", tmp_path / "artifacts")
    return _write_params(tmp_path), tmp_path / "artifacts" / DATASET


STAGES = {
    "decompose": lambda params: decompose_stage(DATASET, params),
    "fuse": lambda params: fuse_stage(DATASET, params, track=False, progress=False),
    "evaluate": lambda params: evaluate_stage(DATASET, params, register=False),
}


def _refused_everywhere(params: Path, *patterns: str) -> None:
    """Every stage that reads pool/ refuses, each message matching every pattern."""
    for stage, run in STAGES.items():
        with pytest.raises(EMMError) as err:
            run(params)
        for pattern in patterns:
            assert pattern in str(err.value), (stage, pattern, str(err.value))


def _pool_json(art: Path) -> dict:
    return json.loads((art / "pool" / "pool.json").read_text())


def _write_pool_json(art: Path, raw: dict) -> None:
    (art / "pool" / "pool.json").write_text(json.dumps(raw, indent=2))


def _rewrite_weights(art: Path, name: str, change, *, record_digest: bool) -> None:
    """Change one member's weights file; with ``record_digest`` pool.json's digest follows, as if pretrain
    itself had written those weights."""
    path = art / "pool" / f"{name}.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path))
    if record_digest:
        raw = _pool_json(art)
        next(m for m in raw["models"] if m["name"] == name)["weights_sha256"] = sha256_file(path)
        _write_pool_json(art, raw)


def _first_float(tensors: dict[str, Tensor]) -> str:
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1 and v.dim() == 2)


# ---- item 2: weights files -------------------------------------------------------------------------------------
def test_swapped_weights_files_are_refused_by_every_stage(project) -> None:
    params, art = project
    a, b = art / "pool" / "income-a.safetensors", art / "pool" / "income-b.safetensors"
    sha_a, sha_b = sha256_file(a), sha256_file(b)
    assert sha_a != sha_b
    a.rename(a.with_suffix(".tmp"))
    b.rename(a)
    a.with_suffix(".tmp").rename(b)
    _refused_everywhere(params, "member 'income-a'", str(a), sha_a, sha_b, "emm pretrain")


def test_an_edited_weights_file_is_refused_by_every_stage(project) -> None:
    params, art = project

    def nudge(tensors: dict[str, Tensor]) -> None:
        tensors[_first_float(tensors)][0, 0] += 0.5

    _rewrite_weights(art, "income-b", nudge, record_digest=False)
    _refused_everywhere(params, "member 'income-b'", "income-b.safetensors", "sha256", "emm pretrain")


# ---- item 4: pool.json edited by hand --------------------------------------------------------------------------
def test_an_edited_task_is_refused_by_every_stage_and_pool_list(project) -> None:
    """The issue: income-b's task set to marital made an income model fuse as a marital donor."""
    params, art = project
    raw = _pool_json(art)
    raw["models"][1]["task"] = "marital"
    _write_pool_json(art, raw)
    _refused_everywhere(params, str(art / "pool" / "pool.json"), "member 'income-b'", "task", "emm pretrain")
    with pytest.raises(EMMError, match=r"member 'income-b'.*task"):
        pool_entries(DATASET, params)


def test_a_self_consistent_edit_is_refused_against_params(project) -> None:
    """Entry, spec and recorded signature all say marital: params.yaml's pool still says income."""
    params, art = project
    raw = _pool_json(art)
    raw["models"][1]["task"] = raw["models"][1]["spec"]["task"] = "marital"
    raw["signatures"]["income-b"]["spec"]["task"] = "marital"
    _write_pool_json(art, raw)
    _refused_everywhere(params, "member 'income-b'", "spec.task is 'marital'", "'income' in pretrain.pool",
                        "emm pretrain")


# ---- item 7: NaN weights and scores, stale components -----------------------------------------------------------
def test_nan_weights_are_refused_by_every_stage_naming_the_member(project) -> None:
    """Written with a matching digest (as a pretrain that diverged would): the NaN itself is refused."""
    params, art = project

    def poison(tensors: dict[str, Tensor]) -> None:
        tensors[_first_float(tensors)][0, 0] = math.nan

    _rewrite_weights(art, "income-a", poison, record_digest=True)
    _refused_everywhere(params, "pool model 'income-a'", "NaN/inf", "emm pretrain")


def test_fuse_and_evaluate_refuse_what_was_made_from_another_pool(project) -> None:
    """A new pool (finite weights, digests right) under old components: fuse used to run on them silently."""
    params, art = project

    def retrain(tensors: dict[str, Tensor]) -> None:
        tensors[_first_float(tensors)].mul_(1.5)

    _rewrite_weights(art, "income-a", retrain, record_digest=True)
    with pytest.raises(EMMError, match=r"components.*made from another pool.*re-run decompose"):
        STAGES["fuse"](params)
    with pytest.raises(EMMError, match=r"fused model in .*fused was made from another pool.*`emm fuse`"):
        STAGES["evaluate"](params)
    STAGES["decompose"](params)  # the way out: the components follow the pool again
    schema = Schema.load(art / "data")
    plan, entries = load_pool_plan(art / "data", art / "pool", art / "components", DecomposeConfig(example_rows=64))
    assert [e.name for e in entries] == [m["name"] for m in POOL] and plan.num_models == len(POOL)
    assert len(load_pool(art / "pool", schema)) == len(POOL)


class LateNaN(nn.Module):
    """A factory model that is fine on the rows the import checks, and NaN where ``dense[:, column]`` exceeds
    ``threshold`` (only later rows do)."""

    def __init__(self, n_dense: int, column: int, threshold: float) -> None:
        super().__init__()
        self.linear = nn.Linear(n_dense, 1)
        self.column, self.threshold = column, threshold

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        out = self.linear(dense)
        late = dense[:, self.column:self.column + 1] > self.threshold
        return torch.where(late, torch.full_like(out, math.nan), out)


def build_late_nan(n_dense: int, column: int, threshold: float) -> nn.Module:
    return LateNaN(n_dense, column, threshold)


def test_an_imported_model_nan_beyond_the_checked_rows_is_refused_naming_it(census_small_data, tmp_path) -> None:
    schema = Schema.load(census_small_data)
    val = load_split(census_small_data, "val", schema)
    column = next(j for j in range(schema.n_dense) if val.dense[:, j].max() > val.dense[:CHECK_ROWS, j].max())
    threshold = float(val.dense[:CHECK_ROWS, column].max())
    bad = int((val.dense[:, column] > threshold).sum())
    weights = tmp_path / "late.safetensors"
    save_file(LateNaN(schema.n_dense, column, threshold).state_dict(), str(weights))
    member = FactoryMember(name="late-nan", task="income", factory=f"{__name__}:build_late_nan",
                           kwargs={"n_dense": schema.n_dense, "column": column, "threshold": threshold},
                           weights=weights)
    with pytest.raises(EMMError, match=rf"pool model 'late-nan' gave {bad} non-finite score\(s\) \(NaN/inf\) of "
                                       rf"{len(val)} rows for task 'income'"):
        import_member(member, census_small_data, tmp_path / "work", store=tmp_path / "mlruns")


# ---- evaluate re-scores the donors -------------------------------------------------------------------------------
def test_evaluate_reports_the_donors_as_it_scores_them_not_pool_json(project) -> None:
    """pool.json's AUCs set to nonsense (the order of val AUCs inverted): the report shows the real ones."""
    params, art = project
    schema = Schema.load(art / "data")
    real: dict[str, dict[str, float]] = {}
    for split in ("val", "test"):
        data = load_split(art / "data", split, schema)
        with torch.no_grad():
            for entry, model in load_pool(art / "pool", schema):
                probs = torch.sigmoid(model(data.sparse, data.dense))[:, 0].numpy()
                i = schema.task_names.index(entry.task)
                real.setdefault(entry.name, {})[split] = roc_auc_score(data.labels[:, i].numpy(), probs)
    raw = _pool_json(art)
    for m in raw["models"]:
        m["test_auc"], m["val_auc"] = 0.999, 1 - real[m["name"]]["val"]
    _write_pool_json(art, raw)

    metrics = STAGES["evaluate"](params)
    for task, row in metrics["tasks"].items():
        names = [m["name"] for m in POOL if m["task"] == task]
        assert row["pool"] == pytest.approx({n: real[n]["test"] for n in names}, abs=1e-12)
        assert row["pool_mean_auc"] == pytest.approx(np.mean([real[n]["test"] for n in names]), abs=1e-12)
        assert row["best_donor_by_val"] == max(names, key=lambda n: real[n]["val"])
    saved = json.loads((art / "eval" / "metrics.json").read_text())
    assert saved["tasks"]["income"]["pool"] == metrics["tasks"]["income"]["pool"]
