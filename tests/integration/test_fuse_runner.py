"""One fuse procedure for every caller: the fuse stage, the benchmark's fused job and the held-out probe
(harness/benchmarks/heldout_fusion.py) all run ``FuseRunner``, and given the same rows and seed they train the same
model, phases and distillation included (the probe used to rebuild the procedure by hand and left both out)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.fusion.options import DecomposeConfig
from emm.fusion.procedure import FuseRunner
from emm.fusion.saved import FUSED_JSON, FUSED_WEIGHTS
from emm.io import read_json
from emm.pipeline.decompose import decompose_pool, load_pool_plan
from emm.pipeline.fuse import fuse
from emm.pipeline.params import FuseConfig, PretrainConfig, TrainConfig
from emm.pipeline.pretrain import pretrain
from harness.benchmarks.heldout_fusion import fuse_held_out
from harness.experiments.jobs import Job, run_job
from harness.experiments.runner import fuse_job_config

TRAIN = TrainConfig(batch_size=512, max_epochs=1, patience=1, lr=5e-3, device="cpu", seed=11)
POOL = [{"name": f"{t}-{a}", "task": t, "arch": a, "hidden": [8, 4]} for t in ("income", "marital")
        for a in ("mlp", "resmlp")]
# every part of the procedure on: the donor stack, a fine-tune phase and distillation
CFG = FuseConfig(train=TRAIN, tower=[4], output="donor_residual", finetune_lr_scale=0.5, distill=0.3)


@pytest.fixture(scope="module")
def seed_dir(census_small_data, tmp_path_factory) -> Path:
    """A benchmark seed folder: pool/ and components/ where the fused job looks for them."""
    root = tmp_path_factory.mktemp("fuse-runner") / "seed-11"
    pretrain("census-income", census_small_data, root / "pool", root / "pool-work",
             PretrainConfig(train=TRAIN, pool={"census-income": POOL}), progress=False)
    decompose_pool(census_small_data, root / "pool", root / "components", DecomposeConfig())
    return root


def test_stage_benchmark_job_and_heldout_probe_run_the_same_runner(seed_dir, census_small_data, monkeypatch):
    calls: list[str] = []
    train_phases = FuseRunner.train

    def spy(self: FuseRunner, *args, **kwargs):
        calls.append(self.desc)
        return train_phases(self, *args, **kwargs)

    monkeypatch.setattr(FuseRunner, "train", spy)
    stage = fuse("census-income", census_small_data, seed_dir / "pool", seed_dir / "components",
                 seed_dir / "stage-fused", seed_dir / "stage-work", CFG, DecomposeConfig(), progress=False)
    job = Job("fused", "full", TRAIN.seed, "income+marital", "census-income", str(census_small_data), str(seed_dir),
              config={"fuse": fuse_job_config(CFG), "decompose": DecomposeConfig().model_dump(mode="json")})
    result = run_job(job, "signature")
    schema = Schema.load(census_small_data)
    train, val = (load_split(census_small_data, s, schema) for s in ("train", "val"))
    plan, entries = load_pool_plan(census_small_data, seed_dir / "pool", seed_dir / "components", DecomposeConfig())
    probe, probe_fit = fuse_held_out(CFG, plan, [e.task for e in entries], schema, TRAIN.seed, train, val,
                                     prepare_rows=val)
    assert calls == ["fused[full]", "fused[full]", "held-out seed 11"]

    meta = read_json(seed_dir / "stage-fused" / FUSED_JSON)
    assert meta["finetune"]["kept"] in ("finetune", "first phase") and meta["distill"] == 0.3
    assert [r.get("phase") for r in probe_fit.history][-1] == "finetune"  # the probe ran the fine-tune too
    assert probe_fit.history == stage.fit.history
    assert {t: m["test_auc"] for t, m in result["tasks"].items()} == {t: m["auc"] for t, m in stage.test.items()}
    saved = load_file(seed_dir / "stage-fused" / FUSED_WEIGHTS)
    by_job = load_file(job.work_dir / "fused" / FUSED_WEIGHTS)
    by_probe = {k: v.contiguous() for k, v in probe.state_dict().items()}
    assert set(saved) == set(by_job) == set(by_probe)
    assert all(torch.equal(saved[k], by_job[k]) and torch.equal(saved[k], by_probe[k]) for k in saved)
