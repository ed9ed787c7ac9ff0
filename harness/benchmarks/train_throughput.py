"""Training throughput: EMM's trainer vs torch-rechub (its MMOE, its ``DataGenerator``, its ``MTLTrainer``).

The peer is what a recsys user runs: torch-rechub 0.9.0's ``MMOE`` with features built from our schema
(one ``SparseFeature`` per sparse column, one ``DenseFeature`` per dense one), fed by its
``DataGenerator`` (a per-row dict Dataset + DataLoader) and trained by ``MTLTrainer.train_one_epoch``.
Three configurations train one epoch over the same ingested rows, batch size and Adam settings,
interleaved round by round in one process (peer, ours, ours-on-its-model, peer, ...), and the medians
are reported with their ratios:

- ``rechub``: torch-rechub's model, loader and trainer.
- ``emm``: EMM's ``Trainer`` (index-sliced tensor batches) on EMM's MMoE of the same size
  (12 experts x [16], towers [8], embedding dim 8 per sparse feature; torch-rechub's MLP layers add a
  BatchNorm each, ours have none).
- ``emm-on-rechub-model``: EMM's ``Trainer`` on torch-rechub's very ``MMOE`` (a thin adapter turns the
  batch tensors into its dict once per batch and drops its sigmoid, since our loss takes logits): the
  same model exactly, so this ratio is the trainer and data path alone.

``--profile`` adds what bounds each: torch.profiler's top operators for a few EMM training steps, and
the peer's epoch split into its loader alone (per-row ``__getitem__`` + collate) and the rest.

    pip install --no-deps torch-rechub==0.9.0        # the optional `rechub` extra
    python -m harness.benchmarks.train_throughput [--data artifacts/census-income/data] [--rows N] [--rounds 3] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # torch-rechub's trainer draws a progress bar per epoch

import numpy as np
import torch
from torch import nn

from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split, offsets
from emm.errors import EMMError
from emm.models.baselines.mmoe import build_mmoe
from emm.train.options import TrainConfig
from emm.train.trainer import Trainer, masked_bce

N_EXPERTS, EXPERT_HIDDEN, TOWER, EMBED_DIM = 12, [16], [8], 8


def rechub() -> Any:
    """The torch_rechub package, or a clear error: it is an optional benchmark dependency."""
    try:
        return importlib.import_module("torch_rechub")
    except ImportError as exc:
        raise EMMError("this benchmark needs torch-rechub: pip install --no-deps torch-rechub==0.9.0 "
                       "(or pip install -e '.[rechub]')") from exc


def rechub_features(schema: Schema, embed_dim: int = EMBED_DIM) -> list:
    """torch-rechub features from our schema, in our column order (fresh objects: torch-rechub caches the
    embedding table on the feature, so two models built from the same objects would share it)."""
    rechub()
    from torch_rechub.basic.features import DenseFeature, SparseFeature

    return ([SparseFeature(f.name, vocab_size=f.vocab_size, embed_dim=embed_dim) for f in schema.sparse]
            + [DenseFeature(f.name) for f in schema.dense])


def rechub_inputs(data: SplitTensors, schema: Schema) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The split as torch-rechub takes it: {feature name: column} with per-feature local indices, labels [N, T]."""
    local = data.sparse.numpy() - offsets(schema)[None, :]
    x = {f.name: local[:, j] for j, f in enumerate(schema.sparse)}
    x.update({f.name: data.dense.numpy()[:, j] for j, f in enumerate(schema.dense)})
    return x, data.labels.numpy()


def build_rechub_mmoe(schema: Schema) -> nn.Module:
    """torch-rechub's MMOE with EMM's MMoE sizes."""
    rechub()
    from torch_rechub.models.multi_task import MMOE

    return MMOE(rechub_features(schema), ["classification"] * len(schema.task_names), N_EXPERTS,
                expert_params={"dims": EXPERT_HIDDEN}, tower_params_list=[{"dims": TOWER}] * len(schema.task_names))


class RechubAsEMM(nn.Module):
    """torch-rechub's model behind EMM's ``(sparse, dense) -> logits`` interface (per batch, not per row)."""

    def __init__(self, model: nn.Module, schema: Schema) -> None:
        super().__init__()
        self.model = model
        self.model.predict_layers = nn.ModuleList(nn.Identity() for _ in model.predict_layers)  # logits out
        self.sparse_names = [f.name for f in schema.sparse]
        self.dense_names = [f.name for f in schema.dense]
        self.register_buffer("offsets", torch.as_tensor(offsets(schema)))

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        local = sparse - self.offsets
        x = {n: local[:, j] for j, n in enumerate(self.sparse_names)}
        x.update({n: dense[:, j] for j, n in enumerate(self.dense_names)})
        return self.model(x)


def rechub_trainer(model: nn.Module, n_tasks: int, cfg: TrainConfig) -> Any:
    rechub()
    from torch_rechub.trainers import MTLTrainer

    return MTLTrainer(model, ["classification"] * n_tasks, optimizer_params={"lr": cfg.lr,
                      "weight_decay": cfg.weight_decay}, n_epoch=1, device="cpu", model_path=os.devnull)


def rechub_loader(x: dict[str, np.ndarray], y: np.ndarray, batch_size: int) -> Any:
    """torch-rechub's own data path: ``DataGenerator`` -> a shuffled DataLoader over a per-row dict Dataset."""
    rechub()
    from torch_rechub.utils.data import DataGenerator

    # its generate_dataloader wants val/test sets too; the same rows stand in (they are never iterated)
    train_loader, _, _ = DataGenerator(x, y).generate_dataloader(x, y, x, y, batch_size=batch_size)
    return train_loader


def rechub_epoch(trainer: Any, loader: Any, rows: int) -> float:
    """One ``MTLTrainer.train_one_epoch``: samples/s (its per-epoch print is swallowed)."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train_one_epoch(loader)
    return rows / (time.perf_counter() - started)


def loader_epoch(model: nn.Module, loader: Any, schema: Schema, cfg: TrainConfig) -> float:
    """One epoch of any ``(sparse, dense) -> logits`` model fed by torch-rechub's loader (its per-row
    dicts stacked back into batch tensors): the peer's data path under another model. Samples/s."""
    names_sparse, names_dense = [f.name for f in schema.sparse], [f.name for f in schema.dense]
    shift = torch.as_tensor(offsets(schema))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    model.train()
    rows = 0
    started = time.perf_counter()
    for x, y in loader:
        sparse = torch.stack([x[n] for n in names_sparse], dim=1).long() + shift
        dense = torch.stack([x[n] for n in names_dense], dim=1).float()
        targets = y.float()
        loss, _ = masked_bce(model(sparse, dense), targets, torch.isnan(targets))  # the loss EMM's trainer pays
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rows += len(y)
    return rows / (time.perf_counter() - started)


def loader_only(loader: Any, rows: int) -> float:
    """Samples/s of iterating the peer's DataLoader alone (per-row __getitem__ + collate), no model."""
    started = time.perf_counter()
    for _ in loader:
        pass
    return rows / (time.perf_counter() - started)


def emm_epoch(trainer: Trainer, data: SplitTensors, epoch: int) -> float:
    """One epoch of EMM's trainer (its own training loop, as ``fit`` runs it): samples/s."""
    started = time.perf_counter()
    trainer.train_epoch(data, epoch=epoch)
    return len(data) / (time.perf_counter() - started)


def profile_emm(trainer: Trainer, data: SplitTensors, steps: int = 40, top: int = 12) -> str:
    """torch.profiler over ``steps`` of EMM's training loop: the operators that take the time."""
    return trainer.profile_epoch(data, steps, epoch=99, top=top)


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("artifacts/census-income/data"))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=0, help="train rows every configuration uses (0: all)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--profile", action="store_true", help="also print what bounds each side")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a shared "
                        "machine 1 avoids spin-waiting against other torch processes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rechub()
    schema = Schema.load(args.data)
    train = load_split(args.data, "train", schema)
    if args.rows:
        train = train.head(args.rows)
    cfg = TrainConfig(batch_size=args.batch_size, device="cpu")
    print(f"data: {args.data}, {len(train):,} train rows; batch {args.batch_size}; torch threads "
          f"{torch.get_num_threads()}; {args.rounds} interleaved rounds")
    print(f"load before: {load_average()}")
    torch.manual_seed(0)
    x, y = rechub_inputs(train, schema)
    loader = rechub_loader(x, y, args.batch_size)
    peer = rechub_trainer(build_rechub_mmoe(schema), len(schema.task_names), cfg)
    ours = Trainer(build_mmoe(schema, N_EXPERTS, EXPERT_HIDDEN, TOWER, EMBED_DIM), cfg, progress=False)
    ours_on_peer_model = Trainer(RechubAsEMM(build_rechub_mmoe(schema), schema), cfg, progress=False)
    rates: dict[str, list[float]] = {"rechub": [], "emm": [], "emm-on-rechub-model": []}
    for r in range(1, args.rounds + 1):
        rates["rechub"].append(rechub_epoch(peer, loader, len(train)))
        rates["emm"].append(emm_epoch(ours, train, r))
        rates["emm-on-rechub-model"].append(emm_epoch(ours_on_peer_model, train, r))
        print(f"  round {r}: " + "  ".join(f"{k} {v[-1]:,.0f}/s" for k, v in rates.items()))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"load after: {load_average()}")
    print(f"MMoE {N_EXPERTS}x{EXPERT_HIDDEN}, towers {TOWER}, batch {args.batch_size} (median samples/s)")
    print(f"  torch-rechub MMOE + DataGenerator + MTLTrainer : {med['rechub']:12,.0f}")
    print(f"  EMM trainer on EMM's MMoE                      : {med['emm']:12,.0f}   "
          f"{med['emm'] / med['rechub']:6.1f}x rechub (target >= 10x)")
    print(f"  EMM trainer on torch-rechub's MMOE (same model): {med['emm-on-rechub-model']:12,.0f}   "
          f"{med['emm-on-rechub-model'] / med['rechub']:6.1f}x rechub")
    if args.profile:
        feed = loader_only(loader, len(train))
        print(f"\nwhat bounds torch-rechub: its loader alone (per-row dict __getitem__ + collate, no model) runs at "
              f"{feed:,.0f} samples/s, i.e. {med['rechub'] / feed:.0%} of its epoch time is feeding")
        print("\nwhat bounds EMM's trainer (torch.profiler, 40 steps of EMM's MMoE, self CPU time):")
        print(profile_emm(ours, train))


if __name__ == "__main__":
    main()
