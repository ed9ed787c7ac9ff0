"""REST serving: ``mlflow models serve`` of ``models:/emm-census-income@champion`` scores raw rows like ``emm predict``.

End to end with real processes: the ``emm`` CLI builds a tiny registry on a real Census slice
(``tiny_registry``, as the MLflow UI test builds it: versions 1 and 2, ``@challenger`` on 2), ``emm promote``
makes the challenger champion, and ``mlflow models serve -m models:/emm-census-income@champion
--env-manager local`` serves it on 127.0.0.1 (its own process group, stopped at the end, and the port
checked closed). Raw UCI test rows, as a user's pandas reads them (integer dense values, text
elsewhere, the label columns too), are posted as MLflow's ``dataframe_split`` JSON, in one request and
one row at a time; the answers must equal ``emm predict`` on the same rows, and a request missing a
required column must be refused with a 4xx that names it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from emm.data.spec import resolve_dataset
from tests.conftest import write_head
from tests.integration.test_mlflow_ui_promote import DATASET, MODEL, emm, free_port, tiny_registry  # noqa: F401

ROWS = 120


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after a grace period, and wait until no
    process of the group is left (the uvicorn worker outlives its parent by a moment)."""
    for sig, grace in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # workers left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def model_server(model_uri: str, env: dict[str, str], cwd: Path, log_path: Path,
                 timeout_s: float = 180) -> Iterator[str]:
    """``mlflow models serve`` on a free loopback port until /ping answers; stopped (process group) on exit."""
    port = free_port()
    args = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
            "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/ping", timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not answer /ping (exit {proc.poll()}):\n"
                                f"{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
            yield base
        finally:
            stop_group(proc)
    assert port_closed(port), f"port {port} still answers after the server's process group was stopped"


def port_closed(port: int, wait_s: float = 10) -> bool:
    """Whether nothing listens on the loopback port (within ``wait_s``: a killed worker takes a moment to go)."""
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def post_split(base: str, frame: pd.DataFrame) -> httpx.Response:
    """``frame`` as MLflow's ``dataframe_split`` JSON (pandas' own split orientation)."""
    payload = {"dataframe_split": frame.to_dict(orient="split", index=False)}
    return httpx.post(f"{base}/invocations", json=payload, timeout=60)


@pytest.mark.slow
def test_served_champion_scores_raw_rows_like_emm_predict(tiny_registry, census_small_raw, tmp_path):
    reg = tiny_registry
    said = emm(["promote", DATASET, "--params", str(reg.params)], reg.env, reg.project)
    assert "promoted version 2" in said, said

    raw = tmp_path / "rows.csv"
    write_head(census_small_raw / "census-income.test.gz", raw, ROWS)
    rows = pd.read_csv(raw, header=None, names=resolve_dataset(DATASET).columns, skipinitialspace=True)
    assert rows["age"].dtype == np.int64 and pd.api.types.is_string_dtype(rows["education"])  # as pandas reads them
    named = tmp_path / "named.csv"
    rows.to_csv(named, index=False)
    emm(["predict", "--model-uri", f"models:/{MODEL}@champion", "--input", str(named), "--output",
         str(tmp_path / "predict.csv"), "--params", str(reg.params)], reg.env, reg.project)
    expected = pd.read_csv(tmp_path / "predict.csv")
    assert len(expected) == ROWS and list(expected.columns) == ["row", "score_income", "score_marital"]

    env = dict(reg.env, MLFLOW_TRACKING_URI=reg.uri, MLFLOW_REGISTRY_URI=reg.uri)
    with model_server(f"models:/{MODEL}@champion", env, reg.project, tmp_path / "serve.log") as base:
        answer = post_split(base, rows)
        assert answer.status_code == 200, answer.text
        served = pd.DataFrame(answer.json()["predictions"])
        singles = []
        for i in range(5):  # one row per request, as an online caller sends them
            one = post_split(base, rows.iloc[[i]])
            assert one.status_code == 200, one.text
            singles.append(pd.DataFrame(one.json()["predictions"]))
        missing = post_split(base, rows.drop(columns=["education"]))
    assert list(served.columns) == ["score_income", "score_marital"] and len(served) == ROWS
    cols = ["score_income", "score_marital"]
    np.testing.assert_allclose(served[cols].to_numpy(), expected[cols].to_numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pd.concat(singles)[cols].to_numpy(), expected[cols].head(5).to_numpy(),
                               rtol=1e-6, atol=1e-7)
    assert served[cols].std().min() > 1e-4  # the rows score differently: a real model answered
    assert 400 <= missing.status_code < 500 and "education" in missing.text, (missing.status_code, missing.text[:500])
