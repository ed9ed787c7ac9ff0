"""A copy of this project to run the orchestrators in (``dvc repro``, a Prefect deployment), and DVC run as
the tests run it: the checkout itself is never written to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def copy_project(dst: Path) -> Path:
    """The checkout's files as git sees them (tracked + untracked, not ignored): code, dvc.yaml, prefect.yaml,
    params/."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    return dst


def dvc_project(dst: Path, census_raw: Path) -> Path:
    """``copy_project`` + a raw Census slice as data/census-income, in a git repository of its own. Its
    data.dvc is removed: the real one describes the full raw folder, this copy has a slice."""
    copy_project(dst)
    shutil.copytree(census_raw, dst / "data" / "census-income")
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    (dst / "data.dvc").unlink()
    return dst


def dvc_env(**extra: str) -> dict[str, str]:
    """This environment with the venv's executables first on PATH (the stages call ``emm``), DVC's analytics
    off, and ``extra`` on top."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
            **extra}


def dvc(args: list[str], cwd: Path, *, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``cwd`` with this venv's DVC (``env``: ``dvc_env()`` unless given), output captured."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env or dvc_env(), capture_output=True,
                          text=True, timeout=timeout)
