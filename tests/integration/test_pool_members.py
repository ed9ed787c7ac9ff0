"""Which members make up ``pool/``, on real Census rows: ``--only`` retrains some and keeps the rest."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Mapping

import pytest
import torch
from safetensors.torch import load_file

from emm.errors import EMMError
from emm.io import read_json
from emm.models.pool import read_pool
from emm.pipeline.decompose import decompose_pool
from emm.pipeline.params import DecomposeConfig, PretrainConfig, TrainConfig
from emm.pipeline.pretrain import pretrain
from emm.tracker import NullTracker

POOL = [
    {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16, 8]},
    {"name": "income-dcn", "task": "income", "arch": "dcn", "hidden": [16, 8]},
    {"name": "marital-mlp", "task": "marital", "arch": "mlp", "hidden": [16, 8]},
]
CFG = PretrainConfig(train=TrainConfig(batch_size=512, max_epochs=2, patience=5, lr=5e-3, device="cpu"),
                     pool={"census-income": POOL})
NAMES = [m["name"] for m in POOL]


@pytest.fixture(scope="module")
def trained_pool(census_small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-members")
    pretrain("census-income", census_small_data, root / "pool", root / "work", CFG, progress=False)
    return root


@pytest.fixture
def pool_copy(trained_pool, tmp_path):
    """A private copy of the trained pool and work folders: the tests below change them."""
    for name in ("pool", "work"):
        shutil.copytree(trained_pool / name, tmp_path / name)
    return tmp_path


class ChildRecorder(NullTracker):
    """Records which pool members got a child run, i.e. were trained in this call."""

    def __init__(self) -> None:
        self.children: list[str] = []

    @contextlib.contextmanager
    def child(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[NullTracker]:
        self.children.append(name)
        yield NullTracker()


def _weights(pool_dir, name: str) -> dict[str, torch.Tensor]:
    return load_file(pool_dir / f"{name}.safetensors")


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_only_retrains_one_member_and_keeps_the_others(pool_copy, census_small_data, caplog):
    root = pool_copy
    before = {e.name: e for e in read_pool(root / "pool")}
    old_weights = {n: _weights(root / "pool", n) for n in NAMES}
    shutil.rmtree(root / "work" / "income-mlp")  # this one only survives in pool/
    trained = ChildRecorder()
    with caplog.at_level("INFO", logger="emm.pipeline.pretrain"):
        entries = pretrain("census-income", census_small_data, root / "pool", root / "work", CFG,
                           only=["income-dcn"], tracker=trained, progress=False)
    assert [e.name for e in entries] == NAMES
    assert "income-mlp: not retrained (--only), reusing " + str(root / "pool") in caplog.text
    assert "marital-mlp: not retrained (--only), reusing " + str(root / "work" / "marital-mlp") in caplog.text
    after = {e.name: e for e in read_pool(root / "pool")}
    assert list(after) == NAMES
    for name in ("income-mlp", "marital-mlp"):  # kept as they were: entry and weights
        assert after[name] == before[name] and _same_weights(_weights(root / "pool", name), old_weights[name])
    assert trained.children == ["income-dcn"]  # the one retrained (fresh: resume was not asked)
    assert after["income-dcn"].epochs_run == 2
    # the symptom: a pool the next stage can use
    plan, _ = decompose_pool(census_small_data, root / "pool", root / "components", DecomposeConfig())
    assert plan.num_models == 3


def test_only_without_a_usable_result_for_the_others_fails_and_writes_nothing(pool_copy, census_small_data):
    root = pool_copy
    pool_json = (root / "pool" / "pool.json").read_bytes()
    changed = CFG.model_copy(update={"train": CFG.train.model_copy(update={"lr": 1e-3})})
    shutil.rmtree(root / "work" / "income-dcn")
    with pytest.raises(EMMError, match=r"--only \['income-dcn'\]: pool model\(s\) \['income-mlp', 'marital-mlp'\] "
                                       r"have no trained result under the current pretrain settings.*run `emm "
                                       r"pretrain` without --only"):
        pretrain("census-income", census_small_data, root / "pool", root / "work", changed, only=["income-dcn"],
                 progress=False)
    assert (root / "pool" / "pool.json").read_bytes() == pool_json  # pool/ untouched
    assert not (root / "work" / "income-dcn").exists()  # nothing trained
    # a fresh folder has nothing to keep at all
    with pytest.raises(EMMError, match=r"\['income-mlp', 'marital-mlp'\] have no trained result"):
        pretrain("census-income", census_small_data, root / "pool2", root / "work2", CFG, only=["income-dcn"],
                 progress=False)
    assert not (root / "pool2").exists() and not (root / "work2").exists()


def test_pool_json_records_each_members_signature(trained_pool):
    raw = read_json(trained_pool / "pool" / "pool.json")
    assert list(raw["signatures"]) == NAMES
    assert raw["signatures"]["income-dcn"]["train"]["lr"] == 5e-3
    assert raw["signatures"]["income-dcn"]["spec"]["arch"] == "dcn"
