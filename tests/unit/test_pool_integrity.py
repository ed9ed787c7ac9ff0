"""The pool on disk is checked, not trusted (issue 22): every member's weights digest, its entry against its
recorded signature and the params' pool, NaN/inf weights and scores, components made from another pool.

Pools here are assembled from tiny hand-made weight files (``assemble_pool``), so nothing is trained."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from emm.errors import EMMError
from emm.fusion import decompose, load_plan, save_plan
from emm.io import sha256_file
from emm.models.pool import POOL_FILE, PoolEntry, read_pool
from emm.models.single_task import ModelSpec
from emm.pipeline.params import PretrainConfig
from emm.pipeline.pretrain import assemble_pool, finished_member, member_key
from emm.train.metrics import auc, task_metrics
from emm.weights import load_module, save_module
from tests.unit.test_decompose import MLPModel, example, trained

NAMES = ("a", "b")
CFG = PretrainConfig()
FINGERPRINT = "f" * 16


def _spec(name: str, task: str = "income") -> ModelSpec:
    return ModelSpec(name=name, task=task, arch="mlp", hidden=[4])


def _entry(name: str) -> PoolEntry:
    return PoolEntry(name=name, task="income", spec=_spec(name), weights=f"{name}.safetensors",
                     schema_fingerprint=FINGERPRINT, params=8, val_auc=0.8, test_auc=0.8, val_logloss=0.4,
                     test_logloss=0.4, epochs_run=1, best_epoch=1, seconds=0.1)


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """pool/ of two members with the same architecture but different weights, as pretrain writes it."""
    work = tmp_path / "work"
    for seed, name in enumerate(NAMES):
        (work / name).mkdir(parents=True)
        torch.manual_seed(seed)
        save_module(nn.Linear(3, 2), work / name / "weights.safetensors")
    return assemble_pool([_entry(n) for n in NAMES], work, tmp_path / "pool", CFG)


def _edit(pool: Path, change) -> None:
    raw = json.loads((pool / POOL_FILE).read_text())
    change(raw)
    (pool / POOL_FILE).write_text(json.dumps(raw))


def _expected() -> dict[str, dict]:
    return {n: member_key(_spec(n), CFG, FINGERPRINT) for n in NAMES}


# ---- weights digests (item 2) ---------------------------------------------------------------------------------
def test_assemble_pool_records_every_members_weights_digest(pool: Path) -> None:
    raw = json.loads((pool / POOL_FILE).read_text())
    for m in raw["models"]:
        assert m["weights_sha256"] == sha256_file(pool / m["weights"]), m["name"]
    assert [e.weights_sha256 for e in read_pool(pool)] == [sha256_file(pool / f"{n}.safetensors") for n in NAMES]


def test_swapped_weights_files_are_refused_naming_member_file_and_both_digests(pool: Path) -> None:
    a, b = pool / "a.safetensors", pool / "b.safetensors"
    sha_a, sha_b = sha256_file(a), sha256_file(b)
    a.rename(pool / "tmp")
    b.rename(a)
    (pool / "tmp").rename(b)
    with pytest.raises(EMMError) as err:
        read_pool(pool)
    msg = str(err.value)
    assert "'a'" in msg and str(a) in msg and sha_a in msg and sha_b in msg and "emm pretrain" in msg


def test_two_members_sharing_one_weights_file_is_refused(pool: Path) -> None:
    """The issue's ``m`` / ``./m``: member b pointed at a's file loaded a's weights without a word."""
    _edit(pool, lambda raw: raw["models"][1].update(weights="a.safetensors"))
    with pytest.raises(EMMError, match=r"member 'b'.*a\.safetensors.*sha256"):
        read_pool(pool)


def test_assemble_pool_refuses_two_members_on_one_file(tmp_path: Path) -> None:
    """Written one after the other, the second file would replace the first under the first's name."""
    work = tmp_path / "work"
    for name in NAMES:
        (work / name).mkdir(parents=True)
        save_module(nn.Linear(3, 2), work / name / "weights.safetensors")
    entries = [_entry("a"), _entry("b").model_copy(update={"weights": "a.safetensors"})]
    with pytest.raises(EMMError, match=r"pool models 'a' and 'b' would share one weights file a\.safetensors"):
        assemble_pool(entries, work, tmp_path / "pool", CFG)
    assert not (tmp_path / "pool").exists()


def test_pool_json_without_digests_is_refused_with_the_way_out(pool: Path) -> None:
    _edit(pool, lambda raw: [m.pop("weights_sha256") for m in raw["models"]])
    with pytest.raises(EMMError, match=r"pool\.json: member 'a' records no weights digest .*older EMM.*"
                                       r"emm pretrain --resume"):
        read_pool(pool)


# ---- the entry against its signature and the params' pool (item 4) -------------------------------------------
def test_edited_task_is_refused_naming_pool_json_member_and_field(pool: Path) -> None:
    _edit(pool, lambda raw: raw["models"][1].update(task="marital"))
    with pytest.raises(EMMError) as err:
        read_pool(pool)
    msg = str(err.value)
    assert str(pool / POOL_FILE) in msg and "member 'b'" in msg and "task" in msg and "'marital'" in msg
    assert "emm pretrain" in msg


def test_entry_disagreeing_with_its_signature_is_refused(pool: Path) -> None:
    """Task edited in the entry and its spec alike: the recorded signature still says income."""
    _edit(pool, lambda raw: (raw["models"][1].update(task="marital"), raw["models"][1]["spec"].update(task="marital")))
    with pytest.raises(EMMError, match=r"member 'b'.*spec\.task.*'marital'.*'income'.*emm pretrain"):
        read_pool(pool)


def test_consistent_edit_is_refused_against_the_params_pool(pool: Path) -> None:
    """Entry, spec and signature all edited alike: only the params' pool can tell."""
    def change(raw: dict) -> None:
        raw["models"][1]["task"] = raw["models"][1]["spec"]["task"] = "marital"
        raw["signatures"]["b"]["spec"]["task"] = "marital"

    _edit(pool, change)
    assert [e.task for e in read_pool(pool)] == ["income", "marital"]  # self-consistent
    with pytest.raises(EMMError, match=r"member 'b'.*spec\.task is 'marital' in .*pool\.json but 'income' in "
                                       r"pretrain\.pool.*emm pretrain"):
        read_pool(pool, expected=_expected())
    params_say_marital = {"a": _expected()["a"], "b": member_key(_spec("b", "marital"), CFG, FINGERPRINT)}
    assert [e.name for e in read_pool(pool, expected=params_say_marital)] == list(NAMES)


def test_members_other_than_the_params_pool_are_refused(pool: Path) -> None:
    with pytest.raises(EMMError, match=r"holds members \['a', 'b'\] but pretrain\.pool gives \['a'\]"):
        read_pool(pool, expected={"a": _expected()["a"]})


def test_only_does_not_carry_a_tampered_member_into_the_new_pool(pool: Path, tmp_path: Path) -> None:
    """``--only`` reuses the others from pool/: a swapped file there would be re-blessed with a fresh digest."""
    assert finished_member(_spec("a"), CFG, FINGERPRINT, tmp_path / "no-work", pool) is not None
    (pool / "a.safetensors").write_bytes((pool / "b.safetensors").read_bytes())
    with pytest.raises(EMMError, match=r"member 'a'.*sha256"):
        finished_member(_spec("a"), CFG, FINGERPRINT, tmp_path / "no-work", pool)


# ---- NaN / inf (item 7) -----------------------------------------------------------------------------------------
def test_nan_weights_are_refused_naming_the_module_and_key(tmp_path: Path) -> None:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
        layer.bias[1] = math.inf
    save_module(layer, tmp_path / "w.safetensors")
    with pytest.raises(EMMError, match=r"'bias' holds 1 NaN/inf value.*pool model 'a'.*rerun `emm pretrain`"):
        load_module(nn.Linear(3, 2), tmp_path / "w.safetensors", what="pool model 'a'", fix="rerun `emm pretrain`")


def test_an_infinite_buffer_is_not_a_broken_weight(tmp_path: Path) -> None:
    """An outside model's mask buffer may hold -inf by design; its outputs are still checked where scored."""
    module = nn.Linear(3, 2)
    module.register_buffer("mask", torch.full((2,), -math.inf))
    save_module(module, tmp_path / "w.safetensors")
    fresh = nn.Linear(3, 2)
    fresh.register_buffer("mask", torch.zeros(2))
    load_module(fresh, tmp_path / "w.safetensors")
    assert torch.equal(fresh.mask, module.mask)


def test_non_finite_scores_are_refused_naming_the_model_and_the_rows() -> None:
    y = np.array([0, 1] * 5, dtype=np.float32)
    scores = np.linspace(0, 1, 10, dtype=np.float32)
    scores[[3, 7]] = [np.nan, np.inf]
    with pytest.raises(EMMError, match=r"pool model 'x' gave 2 non-finite score\(s\) \(NaN/inf\) of 10 rows "
                                       r"for task 'income'"):
        auc(y, scores, what="pool model 'x'", task="income")
    with pytest.raises(EMMError, match=r"fused model gave 2 non-finite score\(s\).*task 'marital'"):
        task_metrics(np.stack([y, y], 1), np.stack([np.linspace(0, 1, 10), scores], 1), ["income", "marital"],
                     what="fused model")


# ---- components made from another pool (item 7: fuse ran on stale components) ---------------------------------
def test_load_plan_refuses_components_made_from_another_pool(tmp_path: Path) -> None:
    models, x = [trained(MLPModel([16, 8]), 0), trained(MLPModel([16, 8]), 1)], example()
    folder = save_plan(decompose(models, x), tmp_path / "plan", tasks=["click", "cvr"], made_from={"pool": "1234"})
    load_plan(folder, [MLPModel([16, 8]), MLPModel([16, 8])], x, made_from={"pool": "1234"})
    with pytest.raises(EMMError, match=r"made from another pool .*pool.*'1234'.*'abcd'.*re-run decompose"):
        load_plan(folder, [MLPModel([16, 8]), MLPModel([16, 8])], x, made_from={"pool": "abcd"})
    older = save_plan(decompose(models, x), tmp_path / "older", tasks=["click", "cvr"])
    with pytest.raises(EMMError, match=r"records no pool it was made from.*re-run decompose"):
        load_plan(older, [MLPModel([16, 8]), MLPModel([16, 8])], x, made_from={"pool": "1234"})
