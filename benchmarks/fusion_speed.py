"""Fused-model speed on Census-Income: training and scoring samples/s, and the EMM trainer vs the same
fused model fed by torch-rechub's data path (its ``DataGenerator``: a per-row dict Dataset + DataLoader),
all in one run on the same data. The fused model is compute-bound, so this ratio says how little the
data path matters for it (``benchmarks/train_throughput.py`` compares whole trainers on MMoE).

Needs the pipeline's artifacts (ingest, pretrain, decompose) and torch-rechub (the `rechub` extra):
    python -m benchmarks.fusion_speed [--dataset census-income] [--train-rows 100000] [--peer-rows 20000]
"""

from __future__ import annotations

import argparse
import time

import torch

from emm.pipeline.params import load_params
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.fusion.fused import build_fused
from emm.pipeline.decompose import load_pool_plan
from emm.pipeline.layout import stage_dir
from emm.train.trainer import Trainer, predict_proba

from benchmarks.train_throughput import loader_epoch, rechub_inputs, rechub_loader


def train_rate(model, data, cfg) -> float:
    trainer = Trainer(model, cfg, progress=False)
    started = time.perf_counter()
    trainer._run_epoch(data, epoch=1)
    return len(data) / (time.perf_counter() - started)


def score_rate(model, data, repeats: int = 3) -> float:
    predict_proba(model, data.head(1000))  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        predict_proba(model, data, batch_size=65536)
    return repeats * len(data) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--train-rows", type=int, default=100_000)
    parser.add_argument("--peer-rows", type=int, default=20_000)
    args = parser.parse_args()
    cfg = load_params(args.params)
    data_dir = stage_dir(cfg, args.dataset, "data")
    schema = Schema.load(data_dir)
    plan, entries = load_pool_plan(data_dir, stage_dir(cfg, args.dataset, "pool"),
                                   stage_dir(cfg, args.dataset, "components"), cfg.decompose)
    train = load_split(data_dir, "train", schema).head(args.train_rows)
    test = load_split(data_dir, "test", schema)
    train_cfg = cfg.fuse.train.model_copy(update={"device": "cpu"})
    print(f"{args.dataset}: {plan.num_models} pool models, {plan.num_levels} levels; torch threads "
          f"{torch.get_num_threads()}; batch {train_cfg.batch_size}")
    torch.manual_seed(0)
    model = build_fused(plan, [e.task for e in entries], schema.task_names, cfg.fuse, schema)
    ours, scoring = train_rate(model, train, train_cfg), score_rate(model.eval(), test)
    torch.manual_seed(0)
    peer_model = build_fused(plan, [e.task for e in entries], schema.task_names, cfg.fuse, schema)
    x, y = rechub_inputs(train.head(args.peer_rows), schema)
    peer = loader_epoch(peer_model, rechub_loader(x, y, train_cfg.batch_size), schema, train_cfg)
    print(f"  training, EMM trainer                     : {ours:12,.0f} samples/s")
    print(f"  training, torch-rechub's DataGenerator feed: {peer:12,.0f} samples/s   ours/peer {ours / peer:5.2f}x")
    print(f"  scoring                                   : {scoring:12,.0f} samples/s   (target >= 1,000,000)")


if __name__ == "__main__":
    main()
