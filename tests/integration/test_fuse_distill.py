"""`fuse.distill` on a small real pool: the fused model trains on the donor ensemble's soft targets, the
teacher never lands in fused/, and the record says it was distilled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from emm.fusion.options import DecomposeConfig
from emm.fusion.saved import FUSED_JSON, FUSED_WEIGHTS
from emm.io import read_json
from emm.pipeline.decompose import decompose_pool
from emm.pipeline.fuse import fuse
from emm.pipeline.params import FuseConfig, PretrainConfig, TrainConfig
from emm.pipeline.pretrain import pretrain

TRAIN = TrainConfig(batch_size=512, max_epochs=1, patience=1, lr=5e-3, device="cpu")
POOL = [{"name": f"{t}-{a}", "task": t, "arch": a, "hidden": [8, 4]} for t in ("income", "marital")
        for a in ("mlp", "resmlp")]


@pytest.fixture(scope="module")
def pool(census_small_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    pretrain("census-income", census_small_data, root / "pool", root / "pool-work",
             PretrainConfig(train=TRAIN, pool={"census-income": POOL}), progress=False)
    decompose_pool(census_small_data, root / "pool", root / "components", DecomposeConfig())
    return root


def fused(root: Path, data: Path, name: str, **cfg) -> tuple[dict, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    fuse("census-income", data, root / "pool", root / "components", root / name, root / f"{name}-work",
         FuseConfig(train=TRAIN, tower=[4], output="tower", **cfg), DecomposeConfig(), progress=False)
    return read_json(root / name / FUSED_JSON), load_file(root / name / FUSED_WEIGHTS)


def test_a_distilled_fusion_is_the_same_model_trained_on_other_targets(pool, census_small_data):
    plain_meta, plain = fused(pool, census_small_data, "plain")
    meta, weights = fused(pool, census_small_data, "distilled", distill=0.5)
    assert meta["distill"] == 0.5 and plain_meta["distill"] == 0.0
    assert set(weights) == set(plain)          # the teacher (the donors' ensemble) is not saved
    assert meta["total_params"] == plain_meta["total_params"]
    trained = [k for k in plain if not torch.equal(plain[k], weights[k])]
    assert trained, "the same seed and data with other targets must train other weights"
    assert set(meta["test"]) == {"income", "marital"} and all(0.5 < m["auc"] <= 1 for m in meta["test"].values())


def test_a_distill_weight_of_one_or_more_is_refused():
    with pytest.raises(ValidationError, match="distill"):
        FuseConfig(distill=1.0)
