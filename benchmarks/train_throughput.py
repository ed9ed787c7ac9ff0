"""Training throughput: EMM's tensor-sliced trainer vs a per-row Dataset + DataLoader of dicts.

The peer is how torch-rechub feeds models: a Dataset returning one dict of per-feature tensors per row,
collated by DataLoader into a dict of batch tensors. Both train the same MMoE-sized model (12 experts of
width 16, Census-Income features) with the same optimiser and batch size in the same process; the peer
is timed on a slice (it is slow) and both are reported as samples/second, with the ratio.

    python -m benchmarks.train_throughput [--data artifacts/census-income/data] [--peer-rows 60000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from emm.pipeline.params import TrainConfig
from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split
from emm.models.baselines.mmoe import build_mmoe
from emm.train.trainer import Trainer


class DictRows(Dataset):
    """One dict of per-feature scalars per row, like torch-rechub's datasets."""

    def __init__(self, data: SplitTensors, schema: Schema) -> None:
        self.names_sparse = [f.name for f in schema.sparse]
        self.names_dense = [f.name for f in schema.dense]
        self.sparse, self.dense, self.labels = data.sparse.numpy(), data.dense.numpy(), data.labels.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = {n: self.sparse[i, j] for j, n in enumerate(self.names_sparse)}
        x.update({n: self.dense[i, j] for j, n in enumerate(self.names_dense)})
        return x, self.labels[i]


def peer_epoch(model: nn.Module, data: SplitTensors, schema: Schema, batch_size: int) -> float:
    ds = DictRows(data, schema)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    started = time.perf_counter()
    for x, y in loader:
        sparse = torch.stack([x[n] for n in ds.names_sparse], dim=1).long()
        dense = torch.stack([x[n] for n in ds.names_dense], dim=1).float()
        loss = loss_fn(model(sparse, dense), y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return len(ds) / (time.perf_counter() - started)


def emm_epoch(model: nn.Module, data: SplitTensors, batch_size: int) -> float:
    trainer = Trainer(model, TrainConfig(batch_size=batch_size, device="cpu"), progress=False)
    started = time.perf_counter()
    trainer._run_epoch(data, epoch=1)
    return len(data) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("artifacts/census-income/data"))
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--peer-rows", type=int, default=60_000, help="rows the (slow) peer is timed on")
    args = parser.parse_args()
    torch.manual_seed(0)
    schema = Schema.load(args.data)
    train = load_split(args.data, "train", schema)
    print(f"data: {args.data} train rows {len(train):,}; torch threads {torch.get_num_threads()}")
    ours = emm_epoch(build_mmoe(schema), train, args.batch_size)
    peer = peer_epoch(build_mmoe(schema), train.head(args.peer_rows), schema, args.batch_size)
    print(f"MMoE 12x[16], batch {args.batch_size}")
    print(f"  emm trainer (tensor slices), full epoch : {ours:12,.0f} samples/s")
    print(f"  per-row Dataset+DataLoader of dicts     : {peer:12,.0f} samples/s  ({args.peer_rows:,} rows)")
    print(f"  ratio                                   : {ours / peer:12.1f}x  (target >= 10x)")


if __name__ == "__main__":
    main()
