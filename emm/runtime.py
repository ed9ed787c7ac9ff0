"""Process-wide defaults set once by every entry point (CLI, flows, tests).

Why: MLflow, Prefect and DVC phone home or write into the home folder unless told not to, and an
offline machine must never wait on that.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

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
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("urllib3", "alembic", "git", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
