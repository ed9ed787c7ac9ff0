"""MLflow's servers as child processes: ``mlflow server`` (the UI) and ``mlflow models serve`` (REST).

Why one helper: the UI test, the REST-serving test and the latency benchmark all start one of these on a
free loopback port, wait until it answers, and must leave nothing behind. ``mlflow models serve`` runs
uvicorn workers that outlive their parent for a moment, so stopping the parent is not enough: the server
gets its own process group (``start_new_session``), and the whole group is stopped, SIGTERM first, then
SIGKILL, until no process of it is left and the port is closed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

from emm.errors import EMMError

LOOPBACK = "127.0.0.1"


def mlflow_executable() -> str:
    """The ``mlflow`` script of this interpreter's environment (not whichever one PATH finds first)."""
    return str(Path(sys.executable).parent / "mlflow")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_closed(port: int, wait_s: float = 10) -> bool:
    """Whether nothing listens on the loopback port (within ``wait_s``: a killed worker takes a moment to go)."""
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) != 0:
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a reused id owned by someone else: not ours any more
        return False
    return True


def stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group, SIGKILL what is left after ``grace_s``, then wait until none of it is left."""
    for sig, grace in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # workers left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def running_server(args: Sequence[str], port: int, ready_path: str, log_path: Path, *,
                   env: Mapping[str, str] | None = None, cwd: Path | None = None,
                   timeout_s: float = 180) -> Iterator[str]:
    """Run ``args`` (a server listening on ``port``) until ``GET ready_path`` answers 200; yield its base URL.

    On exit the process group is stopped and the port checked closed. A server that dies or does not
    answer within ``timeout_s`` raises ``EMMError`` with the end of its log (``log_path``).
    """
    base = f"http://{LOOPBACK}:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(args), cwd=cwd, env=dict(env) if env is not None else None, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}{ready_path}", timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise EMMError(f"{' '.join(args[:3])} did not answer {ready_path} on port {port} "
                                   f"(exit code {proc.poll()}); the end of its log {log_path}:\n"
                                   f"{Path(log_path).read_text()[-4000:]}")
                time.sleep(0.5)
            yield base
        finally:
            stop_group(proc)
    if not port_closed(port):
        raise EMMError(f"port {port} still answers after the server's process group was stopped")


def model_server_args(model_uri: str, port: int) -> list[str]:
    """``mlflow models serve`` of ``model_uri`` on loopback, in this environment (no conda/virtualenv build)."""
    return [mlflow_executable(), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "--host", LOOPBACK, "--port", str(port), "--workers", "1"]
