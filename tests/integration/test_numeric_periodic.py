"""Periodic numeric embeddings (``numeric: {mode: periodic}``) through the whole pipeline on real Census rows:
pool models fit their standardisation before training and keep it in their weights; decomposition treats
the encoder as one layer of level 0; the fused model's fresh embedding copies the pool's encoding and is
fitted too; the saved fused model reloads to the same outputs; a baseline takes the same setting."""

from __future__ import annotations

import pytest
import torch

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.fusion.options import DecomposeConfig
from emm.fusion.saved import load_fused
from emm.models.baselines.registry import build_baseline
from emm.models.embedding import FeatureEmbedding, NumericOptions, PeriodicNumeric, fit_numeric, unfitted_numeric
from emm.models.pool import load_pool
from emm.pipeline.decompose import decompose_pool
from emm.pipeline.fuse import fuse
from emm.pipeline.params import FuseConfig, PretrainConfig, TrainConfig

TRAIN = TrainConfig(batch_size=512, max_epochs=1, patience=1, lr=5e-3, device="cpu")
PERIODIC = {"mode": "periodic", "dim": 4, "frequencies": 6, "sigma": 1.0}
POOL = [{"name": f"{t}-{a}", "task": t, "arch": a, "hidden": [16, 8], "numeric": PERIODIC}
        for t in ("income", "marital") for a in ("mlp", "dcn")]


@pytest.fixture(scope="module")
def periodic_run(census_small_data, tmp_path_factory):
    from emm.pipeline.pretrain import pretrain

    root = tmp_path_factory.mktemp("periodic")
    pretrain("census-income", census_small_data, root / "pool", root / "pool-work",
             PretrainConfig(train=TRAIN, pool={"census-income": POOL}), progress=False)
    plan, _ = decompose_pool(census_small_data, root / "pool", root / "components", DecomposeConfig())
    result = fuse("census-income", census_small_data, root / "pool", root / "components", root / "fused",
                  root / "fused-work", FuseConfig(train=TRAIN, tower=[4], output="donor_residual"), DecomposeConfig(),
                  progress=False)
    return root, plan, result


def test_pool_models_keep_the_statistics_they_were_fitted_on(periodic_run, census_small_data):
    root, _, _ = periodic_run
    schema = Schema.load(census_small_data)
    train = load_split(census_small_data, "train", schema)
    for entry, model in load_pool(root / "pool", schema):
        enc = model.embedding.periodic
        assert isinstance(enc, PeriodicNumeric) and bool(enc.fitted), entry.name
        torch.testing.assert_close(enc.mean, train.dense.mean(0))  # the small slice is under NUMERIC_FIT_ROWS
        assert model.embedding.out_dim == schema.n_sparse * 8 + schema.n_dense * (1 + PERIODIC["dim"])


def test_decomposition_keeps_the_encoder_in_level_0_and_fusion_copies_it(periodic_run, census_small_data):
    _, plan, result = periodic_run
    schema = Schema.load(census_small_data)
    for per_model in plan.components:
        assert any(isinstance(m, PeriodicNumeric) for m in per_model[0].modules())
        assert not any(isinstance(m, PeriodicNumeric) for c in per_model[1:] for m in c.modules())
    fresh = result.model.embedding
    assert isinstance(fresh, FeatureEmbedding) and fresh.numeric.mode == "periodic" and fresh.numeric.dim == 4
    assert bool(fresh.periodic.fitted)  # fitted by the trainer before the first epoch, like the donors
    test = load_split(census_small_data, "test", schema)
    reloaded, meta = load_fused(periodic_run[0] / "fused", schema)
    assert meta["architecture"]["fused"]["embedding"]["numeric"]["mode"] == "periodic"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(test.sparse, test.dense), result.model.eval()(test.sparse, test.dense))


def test_a_baseline_takes_the_same_setting_and_fitting_is_done_once(census_small_data):
    schema = Schema.load(census_small_data)
    model = build_baseline("mmoe", schema, numeric=PERIODIC)
    dense = load_split(census_small_data, "train", schema).dense
    assert unfitted_numeric(model)
    assert fit_numeric(model, dense) == 1 and fit_numeric(model, dense[:10]) == 0  # a fitted encoder is kept
    assert not unfitted_numeric(model)
    plain = build_baseline("mmoe", schema)
    assert plain.embedding.periodic is None and plain.embedding.numeric == NumericOptions()
    assert not unfitted_numeric(plain)  # a min-max model never makes the trainer read rows for statistics
