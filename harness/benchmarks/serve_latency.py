"""REST latency of a served EMM model: p50/p99 for 1 row and for 1,000 rows per request, on loopback.

Starts ``mlflow models serve -m MODEL_URI --env-manager local`` on a free 127.0.0.1 port (its own process
group, stopped at the end) over the params file's MLflow store, or measures a server already running on
this machine (``--url http://127.0.0.1:PORT``; loopback only). Requests are raw rows of the dataset's raw
test file (``dataframe_split`` JSON, as a user's pandas reads them), sent one after another on one
keep-alive connection: the loop is bounded by ``--requests`` per size and by ``--max-seconds`` in all.

    python -m harness.benchmarks.serve_latency [--model-uri models:/emm-census-income@champion] [--params params.yaml]
                                               [--url http://127.0.0.1:PORT] [--requests 200] [--max-seconds 120]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pandas as pd

from emm.data.reader import resolve_file
from emm.data.spec import resolve_dataset
from emm.errors import EMMError
from emm.pipeline.params import load_params
from emm.tracking.processes import free_port, model_server_args, running_server

from harness.benchmarks.train_throughput import load_average

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def serve(model_uri: str, tracking_uri: str, timeout_s: float = 180) -> Iterator[str]:
    """``mlflow models serve`` on loopback until /ping answers; its process group stopped on exit."""
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_REGISTRY_URI=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with running_server(model_server_args(model_uri, port), port, "/ping", Path(tmp) / "serve.log", env=env,
                                timeout_s=timeout_s) as base:
                yield base
        except EMMError as exc:
            raise SystemExit(str(exc)) from exc


def raw_rows(params: str, dataset: str, rows: int) -> pd.DataFrame:
    cfg = load_params(params)
    spec = resolve_dataset(dataset, cfg.datasets)
    path = resolve_file(Path(cfg.paths.raw_root) / dataset, spec.files["test"])
    # keep_default_na=False: a raw value such as "NA" stays text (it is a category), never a NaN JSON cannot carry
    return pd.read_csv(path, header=None, names=spec.columns, sep=spec.delimiter, nrows=rows, skipinitialspace=True,
                       keep_default_na=False)


def measure(client: httpx.Client, base: str, frame: pd.DataFrame, size: int, requests: int,
            deadline: float) -> list[float]:
    """Latencies (ms) of up to ``requests`` requests of ``size`` rows each (rows cycled), until ``deadline``."""
    # encoded before the loop: the latency is the server's (and loopback's), not the client's JSON encoder
    payloads = [json.dumps({"dataframe_split": frame.iloc[i:i + size].to_dict(orient="split", index=False)}).encode()
                for i in range(0, max(len(frame) - size, 0) + 1, max(size, 1))][:50]
    latencies = []
    for i in range(requests):
        if time.monotonic() > deadline:
            break
        started = time.perf_counter()
        answer = client.post(f"{base}/invocations", content=payloads[i % len(payloads)],
                             headers={"Content-Type": "application/json"})
        latencies.append(1e3 * (time.perf_counter() - started))
        if answer.status_code != 200:
            raise SystemExit(f"the server answered {answer.status_code}: {answer.text[:500]}")
        if len(answer.json()["predictions"]) != size:
            raise SystemExit(f"asked for {size} rows of scores, got {len(answer.json()['predictions'])}")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--model-uri", default=None, help="default: models:/emm-<dataset>@champion")
    parser.add_argument("--params", default="params.yaml", help="its tracking.store is the registry served from")
    parser.add_argument("--url", default=None, help="a server already running on this machine (loopback only)")
    parser.add_argument("--requests", type=int, default=200, help="requests per size (the 1,000-row size: a fifth)")
    parser.add_argument("--max-seconds", type=float, default=120, help="the whole loop stops after this")
    args = parser.parse_args()
    if args.url and (urlparse(args.url).hostname or "") not in LOOPBACK:
        raise SystemExit(f"--url {args.url}: this benchmark only sends requests to a server on this machine's loopback")
    frame = raw_rows(args.params, args.dataset, 2000)
    model_uri = args.model_uri or f"models:/emm-{args.dataset}@champion"
    print(f"load before: {load_average()}")
    if args.url:
        server = contextlib.nullcontext(args.url.rstrip("/"))
    else:
        from emm.tracking.store import (
            tracking_uri,  # benchmarks may import the tracking layer: it is the CLI's
        )

        server = serve(model_uri, tracking_uri(load_params(args.params).tracking.store))
    results = {}
    with server as base, httpx.Client(timeout=60) as client:
        print(f"serving {model_uri if not args.url else base} on {base}")
        deadline = time.monotonic() + args.max_seconds
        for size, n in ((1, args.requests), (1000, max(args.requests // 5, 1))):
            measure(client, base, frame, size, 3, deadline)  # warm-up
            results[size] = measure(client, base, frame, size, n, deadline)
    print(f"load after: {load_average()}")
    for size, lat in results.items():
        if not lat:
            print(f"  {size:5d} row(s)/request: no request finished before --max-seconds")
            continue
        p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
        print(f"  {size:5d} row(s)/request: p50 {p50:8.1f} ms  p99 {p99:8.1f} ms  ({len(lat)} requests; "
              f"{size / (p50 / 1e3):,.0f} rows/s at p50)")


if __name__ == "__main__":
    main()
