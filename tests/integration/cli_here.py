"""The ``emm`` CLI's own app run inside the test process, for fixtures that call it many times.

Why: each ``emm`` subprocess pays the stage's imports again (torch, MLflow, the ONNX exporter), seconds every
call on 2 cores, while this process has them loaded already. What the CLI does is the same: its typer app parses
the arguments, calls the stage and prints; only the process boundary is left out. Tests of the CLI *as a
process* (exit codes, no traceback, a user's environment) keep running the console script."""

from __future__ import annotations

from pathlib import Path

import pytest


def run_cli(args: list[str], cwd: Path) -> str:
    """``emm ARGS`` in ``cwd`` as a user's shell there would run it (no MLFLOW_TRACKING_URI: the params' own
    store); asserts exit 0; its output, whitespace-normalised (the console does not wrap: width 400)."""
    from rich.console import Console
    from typer.testing import CliRunner

    from emm.cli import app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("emm.cli.console", Console(width=400))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(cwd)
        result = CliRunner().invoke(app, args)
    said = " ".join(result.output.split())
    assert result.exit_code == 0, f"emm {' '.join(args)}: exit {result.exit_code} ({result.exception!r}):\n{said}"
    return said
