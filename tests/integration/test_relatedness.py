"""``emm relatedness``: the sweep over planted task relatedness runs the real pool -> decompose -> fuse jobs
on ``emm synth`` tables, reports paired CIs under the oracle ceiling, resumes from its cache, and refuses a
table whose rows are not the ones its config generates."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from emm.cli import app
from emm.errors import EMMError
from emm.pipeline.params import load_params
from harness.experiments.relatedness import run_relatedness
from harness.experiments.relatedness_measure import level_key, measure_level

pytestmark = pytest.mark.slow
ROWS = 20_000
WEIGHTS = [0.0, 0.9]


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    """emm's params file; the harness config (``harness_file``) sits beside it."""
    root = tmp_path_factory.mktemp("relatedness")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({
        "tracking": {"store": str(root / "mlruns")},
        "fuse": {"output": "donor_residual", "blend_init": "stack"},
        "synth": {"vocab_sizes": [10, 50, 200]},
    }))
    (root / "benchmark.yaml").write_text(yaml.safe_dump({
        "benchmark": {"out": str(root / "results"), "workers": 2,
                      "relatedness": {"shared_weights": WEIGHTS, "rows": ROWS, "max_epochs": 1, "lightgbm": False,
                                      "recipes": {"paper": {"output": "tower"}}}}}))
    return path


@pytest.fixture(scope="module")
def harness_file(params_file):
    return params_file.with_name("benchmark.yaml")


@pytest.fixture(scope="module")
def sweep(params_file, harness_file):
    return run_relatedness(params_file, config=harness_file, track=False)


def test_the_sweep_reports_every_level_under_the_oracle(sweep):
    assert [lv.shared_weight for lv in sweep.levels] == [w for w in WEIGHTS for _ in ("click", "conversion")]
    by = {(lv.shared_weight, lv.task): lv for lv in sweep.levels}
    # the planted relation: click's truth ranks conversions better when more of the signal is shared
    assert by[(0.9, "conversion")].relation_auc > by[(0.0, "conversion")].relation_auc + 0.05
    for lv in sweep.levels:
        assert set(lv.aucs) == {"EMM", "paper", "best donor", "donor ensemble", "donor stack"}  # LightGBM off
        assert lv.oracle > max(v for vals in lv.aucs.values() for v in vals), lv  # one epoch is far from the truth
        assert {(d.subject, d.against) for d in lv.diffs} == {(s, b) for s in ("EMM", "paper")
                                                              for b in ("best donor", "donor ensemble", "donor stack")}
        for d in lv.diffs:
            assert d.low <= d.diff <= d.high
            assert d.diff == pytest.approx(lv.aucs[d.subject][0] - lv.aucs[d.against][0], abs=1e-9)
        assert lv.best_epochs["EMM"] and lv.best_epochs["paper"]
    md = (sweep.out_dir / "relatedness.md").read_text()
    for w in WEIGHTS:
        assert md.count(f"| {w:.2f} |") == 4  # two tables per task
    with open(sweep.out_dir / "relatedness.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(r["model"] == "oracle" for r in rows) == len(WEIGHTS) * 2
    assert (sweep.out_dir / "relatedness.png").stat().st_size > 10_000


def test_a_rerun_reuses_every_job_and_the_cli_prints_the_table(sweep, params_file, harness_file):
    work = sweep.out_dir / "raw" / "relatedness"
    results = sorted(work.glob("*/seed-*/results/*.json"))
    before = {p: p.stat().st_mtime_ns for p in results}
    files = ["--params", str(params_file), "--config", str(harness_file)]
    out = CliRunner().invoke(app, ["relatedness", *files, "--no-track"])
    assert out.exit_code == 0, out.output
    assert "Where fusion pays" in out.output and "EMM − best donor" in out.output
    assert {p: p.stat().st_mtime_ns for p in results} == before  # nothing was trained again
    bad = CliRunner().invoke(app, ["relatedness", *files, "--shared-weights", "0,x"])
    assert bad.exit_code == 2 and "--shared-weights" in bad.output
    bad = CliRunner().invoke(app, ["relatedness", *files, "--shared-weights", "0,1.5"])
    assert bad.exit_code == 2 and "shared_weights" in bad.output


def test_a_table_whose_labels_changed_is_refused(sweep, params_file):
    cfg = load_params(params_file)
    key = level_key(0.9)
    data_dir = sweep.out_dir / "raw" / "relatedness" / key / "data"
    table = pq.read_table(data_dir / "test.parquet")
    flipped = pa.array(1 - table.column("click").to_numpy(), type=pa.int8())
    pq.write_table(table.set_column(table.schema.get_field_index("click"), "click", flipped), data_dir / "test.parquet")
    results = [json.loads(p.read_text())["result"]
               for p in (data_dir.parent / "seed-2026" / "results").glob("*.json")]
    synth = cfg.synth.model_copy(update={"shared_weight": 0.9, "rows": ROWS})
    with pytest.raises(EMMError, match=f"{key}.*click.*delete"):
        measure_level(results, 0.9, data_dir, synth, ["paper"])
