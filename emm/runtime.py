"""Process-wide defaults set once by every entry point (CLI, flows, tests), and the cores a process may use.

Why: MLflow, Prefect and DVC phone home or write into the home folder unless told not to, and an
offline machine must never wait on that.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rich.logging import RichHandler

QUIET_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def set_quiet_env(project_root: Path | None = None) -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    root = project_root or Path.cwd()
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("urllib3", "alembic", "git", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cpu_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads_for(concurrent: int) -> int:
    """Torch threads each of ``concurrent`` trainings may use.

    Why: two torch processes (or threads) that each spin a full-size thread pool on the same cores slow
    each other 10-100x; splitting the cores (or OMP_NUM_THREADS when set, the caller's budget) avoids it.
    """
    cores = cpu_cores()
    budget = os.environ.get("OMP_NUM_THREADS", "")
    if budget.isdigit() and int(budget) > 0:
        cores = min(cores, int(budget))
    return max(1, cores // max(1, concurrent))
