"""Scoring speed: the fused model in torch eager and in onnxruntime vs the two LightGBM models, same raw rows.

The rows are the first ``--rows`` lines of the raw UCI test file (``data/<dataset>/``), read as
``emm predict`` reads a headerless raw file (text). They are encoded once by the ingestion ``Encoder``
(vocabularies, dense scaling, buckets), which every model needs, and that cost is shown apart; then,
in interleaved rounds (torch, onnxruntime, LightGBM, torch, ...), each model scores the encoded rows and
the medians are reported as rows/s, with ratios, and end to end (encoding included).

- torch eager: the saved fused model (``fused/``), ``predict_proba`` (sigmoid included), batch ``--batch-size``.
- onnxruntime: ``export/fused.onnx`` when it was exported from these fused weights (``emm export``),
  else exported here into a temporary folder; logits -> sigmoid, same batch size.
- pruned (torch eager and onnxruntime): the same model cut down by ``emm.fusion.prune``, when that leaves anything
  out, i.e. when ``fused/`` was saved before the fuse stage pruned (a newer ``fused/`` is pruned already, and its
  cost as trained is read from ``fused.json``). Its scores must equal the saved model's: the max difference is shown.
- LightGBM: one booster per task, trained here by the benchmark's LightGBM row itself
  (``emm.train.lightgbm_row.lightgbm_per_task``: its parameters, features and early stopping); scoring
  both tasks is one row's work.
Every side gets ``--threads`` threads. The ONNX-vs-torch max abs difference is over the same rows.

    python -m harness.benchmarks.score_speed [--dataset census-income] [--rows 50000] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from emm.data.encoding import Encoder
from emm.data.reader import resolve_file
from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.data.tensors import frame_to_tensors
from emm.fusion.prune import prune
from emm.fusion.saved import FUSED_WEIGHTS, load_fused
from emm.io import read_json, sha256_file
from emm.pipeline.export import EXPORT_JSON, ONNX_FILE, UnseenGuard, export_onnx, onnx_logits, onnx_session
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import load_params
from emm.train.cost import model_cost
from emm.train.lightgbm_row import lightgbm_features, lightgbm_per_task
from emm.train.predict import predict_proba

from harness.benchmarks.train_throughput import load_average


def raw_rows(cfg: Any, dataset: str, rows: int) -> pd.DataFrame:
    """The first ``rows`` rows of the dataset's raw test file, as text, in the declaration's columns."""
    spec = resolve_dataset(dataset, cfg.datasets)
    path = resolve_file(Path(cfg.paths.raw_root) / dataset, spec.files["test"])
    return pd.read_csv(path, header=None, names=spec.columns, sep=spec.delimiter, dtype=str, nrows=rows,
                       keep_default_na=False, skipinitialspace=True)


def onnx_file(cfg: Any, dataset: str, model: torch.nn.Module, schema: Schema,
              example: tuple[torch.Tensor, torch.Tensor], tmp: Path) -> tuple[Path, str]:
    """``export/fused.onnx`` if it was made from the current fused weights (and maps out-of-range indices, as
    every ``emm export`` file now does), else a fresh export of the same graph in ``tmp``."""
    export_dir, fused_dir = stage_dir(cfg, dataset, "export"), stage_dir(cfg, dataset, "fused")
    if (export_dir / EXPORT_JSON).is_file():
        record = read_json(export_dir / EXPORT_JSON)
        if record.get("fused_weights_sha256") == sha256_file(fused_dir / FUSED_WEIGHTS) \
                and record.get("sparse_out_of_range") == "unseen":
            return export_dir / ONNX_FILE, f"{export_dir / ONNX_FILE} (emm export)"
    export_onnx(UnseenGuard(model, schema), tmp / ONNX_FILE, example)
    return tmp / ONNX_FILE, "exported here (no export/ of these fused weights)"


def timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads for torch, onnxruntime and LightGBM alike")
    parser.add_argument("--batch-size", type=int, default=65_536, help="rows per torch / onnxruntime call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_params(args.params)
    data_dir = stage_dir(cfg, args.dataset, "data")
    schema = Schema.load(data_dir)
    encoder = Encoder.load(data_dir, schema)
    rows = raw_rows(cfg, args.dataset, args.rows)
    model, meta = load_fused(stage_dir(cfg, args.dataset, "fused"), schema)
    pruned = prune(model)
    prunes = pruned.pruning != model.pruning  # False: fused/ holds the pruned model already
    print(f"{args.dataset}: {len(rows):,} raw test rows; {args.threads} threads each; batch {args.batch_size:,}")
    print(f"load before: {load_average()}")

    encode_s: list[float] = []
    for _ in range(args.rounds):
        seconds, (encoded, tensors) = timed(lambda: (lambda e: (e, frame_to_tensors(e, schema, with_labels=False)))(
            encoder.transform(rows, source="raw rows", first_line=None)))
        encode_s.append(seconds)
    boosters = [row["booster"] for row in lightgbm_per_task(data_dir, params={"num_threads": args.threads}).values()]
    lgb_input = encoded[lightgbm_features(schema)[1]]
    with tempfile.TemporaryDirectory() as tmp:
        example = (tensors.sparse[:64], tensors.dense[:64])
        path, where = onnx_file(cfg, args.dataset, model, schema, example, Path(tmp))
        session = onnx_session(path, threads=args.threads)
        sparse_np, dense_np = tensors.sparse.numpy(), tensors.dense.numpy()
        sides = {
            "torch eager": lambda: predict_proba(model, tensors, args.batch_size),
            "onnxruntime": lambda: 1 / (1 + np.exp(-onnx_logits(session, sparse_np, dense_np, args.batch_size))),
            "LightGBM x2": lambda: np.stack([b.predict(lgb_input, num_iteration=b.best_iteration,
                                                       num_threads=args.threads) for b in boosters], axis=1),
        }
        if prunes:
            export_onnx(UnseenGuard(pruned, schema), Path(tmp) / "pruned.onnx", example)
            pruned_session = onnx_session(Path(tmp) / "pruned.onnx", threads=args.threads)
            sides["pruned torch"] = lambda: predict_proba(pruned, tensors, args.batch_size)
            sides["pruned onnx"] = lambda: 1 / (1 + np.exp(-onnx_logits(pruned_session, sparse_np, dense_np,
                                                                         args.batch_size)))
        for fn in sides.values():  # warm-up
            fn()
        seconds: dict[str, list[float]] = {k: [] for k in sides}
        outputs: dict[str, Any] = {}
        for r in range(args.rounds):
            for k, fn in sides.items():
                s, outputs[k] = timed(fn)
                seconds[k].append(s)
            print(f"  round {r + 1}: " + "  ".join(f"{k} {len(rows) / v[-1]:,.0f}/s" for k, v in seconds.items()))
        with torch.no_grad():
            logits_torch = model(tensors.sparse, tensors.dense).numpy()
            logits_pruned = pruned(tensors.sparse, tensors.dense).numpy()
        logits_onnx = onnx_logits(session, sparse_np, dense_np, args.batch_size)
    cost = model_cost(model, tensors.sparse[:1024], tensors.dense[:1024])
    pruned_cost = model_cost(pruned, tensors.sparse[:1024], tensors.dense[:1024])
    per_row = pruned_cost.flops_per_row

    n = len(rows)
    enc = statistics.median(encode_s)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    lgb = med["LightGBM x2"]
    print(f"load after: {load_average()}")
    print(f"ONNX file: {where}")
    print(f"encoding the raw rows (Encoder.transform + tensors), shared by all: {n / enc:12,.0f} rows/s ({enc:.3f}s)")
    print(f"{'model':14s} {'score rows/s':>13s} {'vs LightGBM':>12s} {'with encoding':>14s} {'vs LightGBM':>12s}")
    for k, s in med.items():
        print(f"{k:14s} {n / s:13,.0f} {lgb / s:11.1f}x {n / (s + enc):14,.0f} {(lgb + enc) / (s + enc):11.1f}x")
    print(f"onnxruntime vs torch eager: {med['torch eager'] / med['onnxruntime']:.2f}x faster")
    print(f"ONNX vs torch, max abs difference on these rows: {np.abs(logits_onnx - logits_torch).max():.3g} (logits), "
          f"{np.abs(outputs['onnxruntime'] - outputs['torch eager']).max():.3g} (probabilities)")
    trained = (meta.get("cost") or {}).get("unpruned")  # a pruned fused/ says what it cost as trained
    as_trained = f"; as trained (fused.json): {trained['flops_per_row']:,} FLOPs per row" if trained else ""
    print(f"fused model as saved in fused/: {cost.flops_per_row:,} FLOPs per row, {cost.parameters:,} parameters"
          + (as_trained if not prunes else ""))
    if prunes:
        print(f"pruned ({', '.join(pruned.pruning.config(pruned.task_names)['why'])}): {pruned_cost.flops_per_row:,} "
              f"FLOPs per row ({cost.flops_per_row / max(pruned_cost.flops_per_row, 1):.1f}x fewer), "
              f"{pruned_cost.parameters:,} parameters; max abs logit difference to the saved model on these rows "
              f"{np.abs(logits_pruned - logits_torch).max():.3g}")
        gain = {k: med[k] / med[f"pruned {p}"] for k, p in (("torch eager", "torch"), ("onnxruntime", "onnx"))}
        print(f"pruned vs saved: torch eager {gain['torch eager']:.2f}x faster, onnxruntime {gain['onnxruntime']:.2f}x "
              f"faster; target >= 2x: {'met' if min(gain.values()) >= 2 else 'NOT met'}")
    best = min(v for k, v in med.items() if k != "LightGBM x2" and (k.startswith("pruned") or not prunes))
    print(f"target: fused model >= 5x LightGBM's rows/s (scoring): {'met' if lgb / best >= 5 else 'NOT met'} "
          f"({lgb / best:.1f}x); the fused model does {per_row / 1e3:,.0f}k FLOPs per row (torch's flop counter), "
          f"i.e. {per_row * n / best / 1e9:.1f} GFLOP/s at its best")


if __name__ == "__main__":
    main()
