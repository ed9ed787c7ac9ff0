"""Commands from outside emm: the paper harness mounts `emm benchmark` and `emm relatedness` through the
`emm.commands` entry point, so `emm --help` lists them while emm imports neither the harness's experiments
nor torch, and a package whose commands fail to load leaves the stages working."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import emm.cli


def test_emm_help_lists_the_harness_commands_without_importing_the_experiments():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom emm.cli import app\n"
            "out = CliRunner().invoke(app, ['--help']).output\n"
            "print(all(f' {c} ' in out for c in ('benchmark', 'relatedness', 'ingest', 'fuse')))\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('harness.experiments')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["True", "[]"], done.stdout


def test_a_package_whose_commands_fail_to_load_is_named_and_the_stages_stay(monkeypatch, capsys):
    broken = EntryPoint(name="broken", value="no_such_package.cli:register", group="emm.commands")
    monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [broken] if group == "emm.commands" else [])
    before = list(emm.cli.app.registered_commands)
    emm.cli._mount_commands()
    assert emm.cli.app.registered_commands == before
    assert "no_such_package.cli:register" in capsys.readouterr().err
