"""The README's "Bring your own models" section runs as written: its factory module and training script, executed in a
project folder holding a real Census slice, produce weights + encoding that its params.yaml entry imports."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from emm.data.batches import UserBatches
from emm.pipeline.pretrain import pretrain_stage
from tests.conftest import REPO

def guide() -> str:
    """The README's "Bring your own models" section, up to the next top-level heading."""
    text = (REPO / "README.md").read_text()
    start = text.index("## Bring your own models\n")
    return text[start:text.index("\n## ", start + 3)]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", guide(), flags=re.S)


def test_guide_snippets_train_and_import(census_small_data, tmp_path, monkeypatch):
    factory, training = blocks("python")[:2]
    (tmp_path / "my_models.py").write_text(factory)
    shutil.copytree(census_small_data, tmp_path / "artifacts" / "census-income" / "data")
    done = subprocess.run([sys.executable, "-c", training], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": f"{tmp_path}:{REPO}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "models" / "income-mine.encoding.json").is_file()

    pool = yaml.safe_load(blocks("yaml")[0])["pretrain"]["pool"]["census-income"]
    mine = next(e for e in pool if e["name"] == "income-mine")
    params = {"paths": {"artifacts": "artifacts"}, "tracking": {"store": "mlruns", "log_models": False},
              "pretrain": {"train": {"max_epochs": 1, "batch_size": 512, "device": "cpu"},
                           "pool": {"census-income": [mine, {"name": "marital-mlp", "task": "marital", "arch": "mlp",
                                                             "hidden": [16]}]}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = pretrain_stage("census-income", "params.yaml", track=False, progress=False)
    assert entries[0].source == "factory" and entries[0].origin.encoding == "recorded"
    import my_models  # the guide's module, as EMM imported it

    model = my_models.build("artifacts/census-income/data")
    model.load_state_dict(load_file("models/income-mine.safetensors"))
    model.eval()
    with torch.no_grad():
        (sparse, dense), y = next(iter(UserBatches("artifacts/census-income/data", "val", tasks="income",
                                                   batch_size=10**6)))
        own = roc_auc_score(y.numpy(), model(sparse, dense).squeeze(1).numpy())
    assert entries[0].val_auc == pytest.approx(own, abs=1e-6) and own > 0.6  # the loop learned, EMM scores it as is
