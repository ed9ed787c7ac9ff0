"""Shared pieces of the bring-your-own-model tests (no tests here): a user's own module, written to a temp
folder the way a stranger's package would be, and two torch-rechub models trained on a real Census slice
with torch-rechub's own trainer, one saved as factory + safetensors, one logged with mlflow.pytorch."""

from __future__ import annotations

import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

USER_MODULE = "byom_user_models"
USER_CODE = textwrap.dedent('''
    """A user's models, outside EMM: torch-rechub ranking models, and a few deliberately broken ones."""
    import torch
    from torch import nn
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.ranking import DCN, DCNv2, WideDeep

    from emm.data.batches import feature_table


    def build(kind, data_dir, embed_dim=8, dims=(16,), cross_layers=2, shrink=None):
        t = feature_table(data_dir)
        sparse = [SparseFeature(n, 10 if n == shrink else v, embed_dim) for n, v in t["sparse"]]
        feats = sparse + [DenseFeature(n) for n in t["dense"]]
        if kind == "dcn":
            return DCN(feats, cross_layers, {"dims": list(dims)})
        if kind == "dcnv2":
            return DCNv2(feats, cross_layers, {"dims": list(dims)}, model_structure="stacked",
                         use_low_rank_mixture=False)
        if kind == "widedeep":
            return WideDeep(sparse, feats, {"dims": list(dims)})
        raise ValueError(kind)


    class Tabular(nn.Module):
        """EMM's (sparse, dense) convention: one table of `rows` rows; `width` outputs per row."""

        def __init__(self, rows, n_sparse, n_dense, width=1, broken=False, branch=False):
            super().__init__()
            self.emb = nn.Embedding(rows, 4)
            self.out = nn.Linear(4 * n_sparse + n_dense, width)
            self.broken, self.branch = broken, branch

        def forward(self, sparse, dense):
            if self.broken:
                raise RuntimeError("feature store offline")
            h = self.out(torch.cat([self.emb(sparse).flatten(1), dense], 1))
            if self.branch and h.sum() > 0:
                return h * 2
            return h


    def tabular(data_dir, rows_less=0, **kw):
        t = feature_table(data_dir)
        total = sum(v for _, v in t["sparse"])
        return Tabular(total - rows_less, len(t["sparse"]), len(t["dense"]), **kw)
''')


@pytest.fixture(scope="session")
def user_code(tmp_path_factory):
    """A folder holding the user's module, on sys.path for this session (as PYTHONPATH would put it)."""
    folder = tmp_path_factory.mktemp("user-code")
    (folder / f"{USER_MODULE}.py").write_text(USER_CODE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop(USER_MODULE, None)


@dataclass
class Trained:
    data_dir: Path
    store: Path
    dcn_weights: Path           # factory + safetensors (+ encoding sidecar)
    dcn_kwargs: dict
    dcnv2_uri: str              # mlflow.pytorch model, registered, alias prod
    own_val_auc: dict[str, float]


def own_auc(model: torch.nn.Module, data_dir: Path, task: str) -> float:
    """The model's val AUC computed the user's way: its own forward on UserBatches, sklearn's AUC."""
    from emm.data.batches import UserBatches

    model.eval()
    ys, ps = [], []
    with torch.no_grad():
        for x, y in UserBatches(data_dir, "val", tasks=task, inputs="dict", batch_size=4096):
            ys.append(y.numpy())
            ps.append(model(x).numpy())
    return float(roc_auc_score(np.concatenate(ys), np.concatenate(ps)))


def fit_rechub(model: torch.nn.Module, data_dir: Path, task: str, out: Path) -> None:
    """Train with torch-rechub's own CTRTrainer on EMM's batches (dict convention)."""
    from torch_rechub.trainers import CTRTrainer

    from emm.data.batches import UserBatches

    train = UserBatches(data_dir, "train", tasks=task, inputs="dict", batch_size=512, shuffle=True, seed=3)
    val = UserBatches(data_dir, "val", tasks=task, inputs="dict", batch_size=4096)
    out.mkdir(parents=True, exist_ok=True)
    CTRTrainer(model, optimizer_params={"lr": 3e-3, "weight_decay": 1e-6}, n_epoch=2, earlystop_patience=2,
               model_path=str(out)).fit(train, val)


@pytest.fixture(scope="session")
def trained_rechub(user_code, census_small_data, tmp_path_factory) -> Trained:
    """DCN (marital) saved as factory + safetensors with its encoding; DCNv2 (income) logged with
    mlflow.pytorch.log_model (pickle), its encoding logged, registered as rechub-income@prod."""
    import importlib

    import mlflow
    import mlflow.pytorch
    from safetensors.torch import save_file

    from emm.data.batches import save_encoding
    from emm.tracking.external import log_encoding
    from emm.tracking.store import configure

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("rechub")
    mod = importlib.import_module(USER_MODULE)
    dcn_kwargs = {"kind": "dcn", "data_dir": str(census_small_data), "dims": [16]}
    dcn = mod.build(**dcn_kwargs)
    fit_rechub(dcn, census_small_data, "marital", root / "dcn")
    weights = root / "marital-dcn.safetensors"
    save_file(dcn.state_dict(), str(weights))
    save_encoding(weights, census_small_data)

    dcnv2 = mod.build("dcnv2", str(census_small_data), dims=[16])
    fit_rechub(dcnv2, census_small_data, "income", root / "dcnv2")
    store = root / "mlruns"
    configure(store)
    mlflow.set_experiment("rechub")
    with mlflow.start_run():
        mlflow.pytorch.log_model(dcnv2, name="model", serialization_format="pickle",
                                 pip_requirements=["torch", "torch-rechub==0.9.0"],
                                 registered_model_name="rechub-income")
        log_encoding(census_small_data)
    mlflow.MlflowClient().set_registered_model_alias("rechub-income", "prod", "1")
    return Trained(census_small_data, store, weights, dcn_kwargs, "models:/rechub-income@prod",
                   {"marital": own_auc(dcn, census_small_data, "marital"),
                    "income": own_auc(dcnv2, census_small_data, "income")})


TINY_TRAIN = {"lr": 0.01, "batch_size": 512, "max_epochs": 2, "patience": 2, "seed": 2026, "device": "cpu"}


def project(tmp_path: Path, data_dir: Path, pool: list[dict], *, store: Path, align: str = "identical",
            log_models: bool = False) -> Path:
    """A params.yaml (tiny training) whose artifacts folder already holds the ingested slice; returns its path."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(data_dir, artifacts / "census-income" / "data")
    params = {"paths": {"artifacts": str(artifacts)},
              "pretrain": {"train": TINY_TRAIN, "pool": {"census-income": pool}},
              "decompose": {"example_rows": 64, "align": align},
              "tracking": {"store": str(store), "log_models": log_models},
              "fuse": {"tower": [4], "train": TINY_TRAIN}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def set_align(params: Path, align: str) -> None:
    raw = yaml.safe_load(params.read_text())
    raw["decompose"]["align"] = align
    params.write_text(yaml.safe_dump(raw))
