"""Raw-row encoding speed on one core: EMM's ``Encoder.transform`` vs the pandas and scikit-learn ways.

The rows are the raw Census file as ingestion reads it (``emm.data.reader.iter_chunks``: Arrow-backed text,
stripped), repeated up to ``--rows``; the encoder is fitted on the same file as ``emm ingest`` fits it
(vocabularies, min-max ranges, 32 quantile buckets per dense column). Every side maps the same rows to the
same things: each categorical column to its vocabulary index (0 = unseen), each dense column parsed from
text, min-max scaled and put in its bucket.

- EMM: ``Encoder.transform`` (canonical codes, strip, unseen values and the dense checks included);
- pandas: ``astype(CategoricalDtype(vocabulary)).cat.codes + 1`` per categorical column, ``pd.to_numeric``,
  ``np.clip`` and ``np.searchsorted`` per dense column (what a user would write by hand, without the
  checks);
- scikit-learn: ``OrdinalEncoder`` (categories = the vocabularies, unknown -> -1) on the categorical
  columns, ``pd.to_numeric`` + ``MinMaxScaler`` + ``np.searchsorted`` on the dense ones (fitted outside
  the timing).
Single-threaded (``OMP_NUM_THREADS=1``, one Arrow thread); interleaved rounds, medians reported as rows/s
with ratios. The sides' sparse indices are checked equal on these rows before any timing.

    python -m harness.benchmarks.encode_speed [--rows 1000000] [--rounds 3] [--raw-dir data/census-income]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy is imported: one core, as the target says

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
from sklearn.preprocessing import MinMaxScaler, OrdinalEncoder  # noqa: E402

from emm.data.encoding import Encoder  # noqa: E402
from emm.data.ingest import plan_features  # noqa: E402
from emm.data.reader import file_columns, iter_chunks, resolve_file  # noqa: E402
from emm.data.spec import resolve_dataset  # noqa: E402
from emm.pipeline.params import load_params  # noqa: E402

from harness.benchmarks.train_throughput import load_average  # noqa: E402

DATASET = "census-income"


def fitted_rows(raw_dir: Path, rows: int) -> tuple[Encoder, pd.DataFrame]:
    """The encoder fitted on the raw train file as ingestion fits it, and ``rows`` raw rows (the file repeated)."""
    spec = resolve_dataset(DATASET)
    path = resolve_file(raw_dir, spec.files["train"])
    plan = plan_features(spec, spec.select_tasks(None), file_columns(spec, path), path)
    sparse = plan.sparse
    encoder = Encoder(sparse=sparse, dense=plan.dense, bucketed=plan.dense, n_buckets=spec.dense_buckets)
    frames = []
    for chunk in iter_chunks(spec, path, 64 << 20):
        encoder.partial_fit(chunk.frame, source=str(path), first_line=chunk.lines, missing=spec.dense_missing)
        frames.append(chunk.frame[sparse + list(spec.dense)])
    encoder.finish()
    raw = pd.concat(frames, ignore_index=True)
    raw = pd.concat([raw] * -(-rows // len(raw)), ignore_index=True).iloc[:rows].reset_index(drop=True)
    return encoder, raw


def pandas_side(encoder: Encoder) -> Callable[[pd.DataFrame], dict[str, np.ndarray]]:
    types = {c: pd.CategoricalDtype(encoder.vocab[c]) for c in encoder.sparse}

    def run(raw: pd.DataFrame) -> dict[str, np.ndarray]:
        out = {c: raw[c].astype(types[c]).cat.codes.to_numpy() + 1 for c in encoder.sparse}
        for c in encoder.dense:
            x = pd.to_numeric(raw[c]).to_numpy(dtype=np.float64)
            lo, hi = encoder.minimum[c], encoder.maximum[c]
            out[encoder.bucket_name(c)] = np.searchsorted(np.asarray(encoder.edges[c]), x) + 1
            out[c] = np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        return out
    return run


def sklearn_side(encoder: Encoder, raw: pd.DataFrame) -> Callable[[pd.DataFrame], dict[str, np.ndarray]]:
    ordinal = OrdinalEncoder(categories=[encoder.vocab[c] for c in encoder.sparse], handle_unknown="use_encoded_value",
                             unknown_value=-1, dtype=np.int64).fit(raw[encoder.sparse].head(1000).astype(object))
    scaler = MinMaxScaler(clip=True).fit(np.array([[encoder.minimum[c] for c in encoder.dense],
                                                   [encoder.maximum[c] for c in encoder.dense]]))

    def run(raw: pd.DataFrame) -> dict[str, np.ndarray]:
        codes = ordinal.transform(raw[encoder.sparse].astype(object)) + 1
        out = {c: codes[:, i] for i, c in enumerate(encoder.sparse)}
        x = np.column_stack([pd.to_numeric(raw[c]).to_numpy(dtype=np.float64) for c in encoder.dense])
        scaled = scaler.transform(x).astype(np.float32)
        for i, c in enumerate(encoder.dense):
            out[encoder.bucket_name(c)] = np.searchsorted(np.asarray(encoder.edges[c]), x[:, i]) + 1
            out[c] = scaled[:, i]
        return out
    return run


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw-dir", type=Path, default=None, help="folder of the raw Census files "
                        "(default: paths.raw_root/census-income of --params)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    raw_dir = args.raw_dir or Path(load_params(args.params).paths.raw_root) / DATASET
    encoder, raw = fitted_rows(raw_dir, args.rows)
    print(f"{DATASET}: {len(raw):,} raw rows ({len(encoder.sparse)} categorical + {len(encoder.dense)} dense "
          f"columns, {len(encoder.bucketed)} bucketed); one core (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    print(f"load before: {load_average()}")
    sides: dict[str, Callable[[], object]] = {
        "EMM Encoder": lambda: encoder.transform(raw, source="raw rows", first_line=1),
        "pandas categorical": lambda: pandas_side(encoder)(raw),
        "sklearn Ordinal+MinMax": lambda: sklearn_side(encoder, raw)(raw),
    }
    outputs = {name: fn() for name, fn in sides.items()}  # warm-up, and the check that all sides agree
    ours = outputs["EMM Encoder"]
    for name, out in outputs.items():
        for col in encoder.sparse_features:
            if not np.array_equal(np.asarray(ours[col]), np.asarray(out[col])):
                raise SystemExit(f"{name} disagrees with the EMM Encoder on {col!r}: not the same work")
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(args.rounds):
        for name, fn in sides.items():
            seconds[name].append(timed(fn)[0])
        print(f"  round {r + 1}: " + "  ".join(f"{k} {len(raw) / v[-1]:,.0f}/s" for k, v in seconds.items()))
    print(f"load after: {load_average()}")
    med = {name: statistics.median(s) for name, s in seconds.items()}
    ours_s = med["EMM Encoder"]
    print(f"{'side':24s} {'rows/s':>12s} {'seconds':>8s} {'EMM speed-up':>13s}")
    for name, s in med.items():
        print(f"{name:24s} {len(raw) / s:12,.0f} {s:8.3f} {s / ours_s:12.1f}x")
    rate = len(raw) / ours_s
    print(f"target: >= 1,000,000 raw rows/s on one core: {'met' if rate >= 1e6 else 'NOT met'} ({rate:,.0f})")


if __name__ == "__main__":
    main()
