"""Peak memory of training over N synthetic AliExpress-layout rows: streamed vs loaded into memory.

Each side runs in a fresh process and reports its own peak RSS (``ru_maxrss``), so neither inherits the
other's pages. Both train the same pool member (``click-mlp``, MLP 128-64-16 as ``emm pretrain`` builds
it) for one epoch with validation, through the same ``Trainer``:
- stream: ``ParquetStream`` over train/val (row groups + a ``scale.buffer_rows`` shuffle buffer);
- peer:  ``load_split`` (the in-memory path every stage used so far) of a table of ``--peer-rows`` rows.
  The peer is *not* run at 20M rows by default: at ~1 KB/row of transient peak it would not fit this
  24 GB machine; its measured bytes per row are printed and extrapolated, labelled as such.

    python -m harness.benchmarks.stream_memory --rows 20000000 [--peer-rows 2000000] [--threads 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1 << 30


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KB


def child(mode: str, data: Path, threads: int, buffer_rows: int) -> dict:
    """One measured training run (in its own process)."""
    import torch

    torch.set_num_threads(threads)
    from emm.pipeline.params import ScaleConfig, TrainConfig
    from emm.data.schema import Schema
    from emm.data.stream import open_split
    from emm.models.single_task import ModelSpec, build_model
    from emm.train.trainer import Trainer

    schema = Schema.load(data)
    torch.manual_seed(0)
    model = build_model(ModelSpec(name="click-mlp", task="click", arch="mlp", hidden=[128, 64, 16]), schema)
    base = peak_rss_bytes()  # interpreter + torch + model: the same on both sides
    scale = ScaleConfig(stream="always" if mode == "stream" else "never", buffer_rows=buffer_rows)
    started = time.perf_counter()
    train, val = (open_split(data, s, schema, scale).select_tasks(["click"]) for s in ("train", "val"))
    loaded = time.perf_counter() - started
    cfg = TrainConfig(batch_size=1024, max_epochs=1, device="cpu")
    fit = Trainer(model, cfg, progress=False, desc=mode).fit(train, val)
    seconds = time.perf_counter() - started
    return {"mode": mode, "train_rows": len(train), "val_rows": len(val), "base_rss": base,
            "peak_rss": peak_rss_bytes(), "load_s": loaded, "seconds": seconds,
            "rows_per_s": len(train) / seconds, "val_auc": fit.best_val_auc, "threads": threads}


def run_child(mode: str, data: Path, threads: int, buffer_rows: int) -> dict:
    cmd = [sys.executable, "-m", "harness.benchmarks.stream_memory", "--child", mode, "--data", str(data),
           "--threads", str(threads), "--buffer-rows", str(buffer_rows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"mode": mode, "error": (done.stderr or done.stdout)[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def synth(rows: int, out: Path) -> float:
    from emm.pipeline.params import load_params
    from emm.data.synth import synthesize

    started = time.perf_counter()
    cfg = load_params().synth.model_copy(update={"rows": rows})
    synthesize(cfg, out)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000, help="synthetic rows (train+val+test) for the stream")
    ap.add_argument("--peer-rows", type=int, default=2_000_000, help="rows for the in-memory peer (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--buffer-rows", type=int, default=None, help="shuffle buffer (default params.yaml scale)")
    ap.add_argument("--keep", type=Path, default=None, help="write/reuse the synthetic data here instead of a temp dir")
    ap.add_argument("--child", choices=["stream", "memory"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from emm.pipeline.params import load_params

    buffer_rows = args.buffer_rows or load_params().scale.buffer_rows
    if args.child:
        print(json.dumps(child(args.child, args.data, args.threads, buffer_rows)))
        return

    root = args.keep or Path(tempfile.mkdtemp(prefix="emm-stream-bench-"))
    try:
        results = []
        big = root / f"synth-{args.rows}" / "data"
        made = synth(args.rows, big) if not (big / "schema.json").exists() else None
        if made is not None:
            print(f"emm synth: {args.rows:,} rows in {made:.0f}s ({args.rows / made:,.0f} rows/s), "
                  f"{sum(f.stat().st_size for f in big.iterdir()) / GB:.2f} GB on disk")
        results.append(run_child("stream", big, args.threads, buffer_rows))
        if args.peer_rows:
            small = root / f"synth-{args.peer_rows}" / "data"
            if not (small / "schema.json").exists():
                synth(args.peer_rows, small)
            results.append(run_child("memory", small, args.threads, buffer_rows))
            results.append(run_child("stream", small, args.threads, buffer_rows))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\none epoch of click-mlp (MLP 128-64-16, batch 1024, {args.threads} torch thread(s)) + validation; "
          f"buffer_rows={buffer_rows:,}")
    print(f"{'mode':<8}{'train rows':>13}{'peak RSS GB':>13}{'above base GB':>15}{'rows/s':>10}{'seconds':>9}{'val AUC':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['mode']:<8} failed: {r['error']}")
            continue
        print(f"{r['mode']:<8}{r['train_rows']:>13,}{r['peak_rss'] / GB:>13.2f}{(r['peak_rss'] - r['base_rss']) / GB:>15.2f}"
              f"{r['rows_per_s']:>10,.0f}{r['seconds']:>9.0f}{r['val_auc']:>9.4f}")
    peer = next((r for r in results if r["mode"] == "memory" and "error" not in r), None)
    if peer:
        per_row = (peer["peak_rss"] - peer["base_rss"]) / peer["train_rows"]
        train_rows = results[0].get("train_rows", 0)
        print(f"in-memory peer: {per_row:,.0f} bytes of peak per training row -> extrapolated to "
              f"{train_rows:,} rows: {(peer['base_rss'] + per_row * train_rows) / GB:.1f} GB (not run)")


if __name__ == "__main__":
    main()
