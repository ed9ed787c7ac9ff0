"""The scarce-label benchmark's quick variant end to end (``emm benchmark aliexpress-synth --profile scarce
--quick``): real synth data with conversion labels held back, the real pool -> decompose -> fuse jobs, every
rival; the table has every row with a paired CI, the plot and json exist, and a rerun reuses the cell."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from emm.cli import app
from emm.io import read_yaml
from harness.experiments.scarce_plan import DEFAULT_SCARCE_CONFIG
from harness.experiments.scarce_run import run_scarce

pytestmark = pytest.mark.slow
ROWS = ["EMM", "EMM (cross_residual)", "best donor", "own-task stack", "cross-task stack", "click donor alone",
        "MMoE", "SharedBottom", "LightGBM", "oracle"]
CI = r"[+-]\d\.\d{4} \[[+-]\d\.\d{4}, [+-]\d\.\d{4}\]"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("scarce")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"store": str(root / "mlruns")}}))
    raw = read_yaml(DEFAULT_SCARCE_CONFIG, "scarce config")
    raw["scarce"]["out"] = str(root / "results")
    config = root / "scarce.yaml"
    config.write_text(yaml.safe_dump(raw))
    return params, config, root / "results" / "aliexpress-synth" / "scarce-quick"


@pytest.fixture(scope="module")
def cli_run(files):
    params, config, _ = files
    return CliRunner().invoke(app, ["benchmark", "aliexpress-synth", "--profile", "scarce", "--quick",
                                    "--params", str(params), "--config", str(config), "--no-track"])


def test_the_quick_cell_reports_every_row_with_a_paired_ci(cli_run, files):
    assert cli_run.exit_code == 0, cli_run.output
    out = files[2]
    md = (out / "scarce.md").read_text()
    assert "When fusion pays" in cli_run.output
    section = md.split("## w=0.9, conversion 20.0% ★", 1)[1].split("## Cost", 1)[0]
    for row in ROWS:
        line = next(ln for ln in section.splitlines() if ln.startswith(f"| {row} |"))
        cis = re.findall(CI, line)
        assert len(cis) == (1 if row.startswith("EMM") else 2), line  # each fused model − every other row
    data = json.loads((out / "scarce.json").read_text())
    (group,) = data["groups"]
    assert group["seeds"] == [2026] and set(group["aucs"]) == set(ROWS)
    assert group["counts"]["test_positives"] > 50
    # the labels were held back: about 20% of the train rows carry conversion's label, test keeps all
    assert 0.15 * 18000 < group["counts"]["train_labelled"] < 0.25 * 18000 and group["counts"]["test_rows"] == 3000
    for d in group["diffs"]:
        assert d["low"] <= d["diff"] <= d["high"]
        assert d["diff"] == pytest.approx(group["aucs"][d["subject"]][0] - group["aucs"][d["against"]][0], abs=1e-9)
    oracle = group["aucs"]["oracle"][0]
    assert all(v[0] < oracle for m, v in group["aucs"].items() if m != "oracle")  # three epochs on 24k rows are far from the truth
    assert {"fuse (EMM)", "fuse (cross_residual)", "MMoE", "SharedBottom"} <= set(group["seconds"])
    assert (out / "scarce.png").stat().st_size > 10_000


def test_a_rerun_reuses_the_finished_cell(cli_run, files):
    params, config, out = files
    cell = next((out / "cells").glob("*.json"))
    before = cell.stat().st_mtime_ns
    run = run_scarce("aliexpress-synth", params, config=config, variant="quick", track=False)
    assert run.trained == 0 and not run.failed and len(run.records) == 1
    assert cell.stat().st_mtime_ns == before
