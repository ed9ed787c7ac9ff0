"""The main job installs what the pipeline needs and nothing else; the browser is the test command's.

Why: Debian's Chromium serves one test (the MLflow UI promotion in a real browser); installing it in the
main job cost minutes of apt-get before the pipeline started. Both scripts are run for real here, with a
Chromium path that does not exist and an ``apt-get`` on PATH that records being called instead of installing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO


def run_script(script: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, bool]:
    """Run ``scripts/<script>``; returns the process and whether it called apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    called = tmp_path / "apt-get-called"
    fake = bin_dir / "apt-get"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {called}\nexit 1\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "EMM_CHROMIUM": str(tmp_path / "no-chromium")}
    out = subprocess.run(["bash", f"scripts/{script}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    return out, called.exists()


def test_the_main_jobs_install_knows_no_browser(tmp_path):
    out, called_apt = run_script("setup.sh", tmp_path)  # the venv is current: it installs nothing, quickly
    assert out.returncode == 0, out.stderr
    assert "chromium" not in (out.stdout + out.stderr).lower() and not called_apt
    assert "browser.sh" not in (REPO / "scripts" / "run-pipeline.sh").read_text()


def test_the_test_command_installs_the_browser(tmp_path):
    assert "bash scripts/browser.sh" in (REPO / "scripts" / "test.sh").read_text()
    out, _ = run_script("browser.sh", tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"no Chromium at {tmp_path / 'no-chromium'}" in out.stderr  # it looked for the browser and said so
