"""The one helper that starts MLflow's servers for the UI test, the REST test and the latency benchmark:
it waits for the ready URL, stops the whole process group and leaves the port closed; a server that dies
is reported with its log."""

from __future__ import annotations

import sys

import httpx
import pytest

from emm.errors import EMMError
from emm.tracking.processes import free_port, port_closed, running_server


def test_server_answers_then_its_group_is_gone_and_the_port_closed(tmp_path):
    port = free_port()
    # a parent that forks a child which serves: stopping only the parent would leave the child listening
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-m', 'http.server', '{port}', "
            f"'--bind', '127.0.0.1', '--directory', {str(tmp_path)!r}]); time.sleep(600)")
    (tmp_path / "ready").write_text("ok")
    with running_server([sys.executable, "-c", code], port, "/ready", tmp_path / "log.txt", timeout_s=60) as base:
        assert httpx.get(f"{base}/ready").text == "ok"
    assert port_closed(port, wait_s=0)


def test_a_server_that_dies_is_reported_with_its_log(tmp_path):
    port = free_port()
    code = "import sys; print('cannot open the store: no such table'); sys.exit(3)"
    with pytest.raises(EMMError, match=r"(?s)exit code 3.*cannot open the store"):
        with running_server([sys.executable, "-c", code], port, "/health", tmp_path / "log.txt", timeout_s=60):
            pass
