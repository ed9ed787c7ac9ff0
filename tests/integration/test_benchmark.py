"""`emm benchmark` on real Census rows: every baseline learns on real data, and a tiny profile of
the whole benchmark writes Table I/II (with the donor ensemble and stack rows and EMM's paired CIs),
Figure 3, the selection heat map and one MLflow parent run, and a second run reuses every finished job."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import roc_auc_score

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.io import read_json
from emm.models.baselines.registry import build_baseline
from harness.experiments.members import NETWORKS_EMM
from harness.params import BASELINE_NAMES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_each_baseline_loss_falls_on_real_rows(name: str, census_small_data: Path) -> None:
    schema = Schema.load(census_small_data)
    train = load_split(census_small_data, "train", schema)
    torch.manual_seed(0)
    model = build_baseline(name, schema)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_s, x_d, y = train.sparse[:2048], train.dense[:2048], train.labels[:2048]

    def loss() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(x_s, x_d), y)

    model.eval()
    with torch.no_grad():
        before = loss().item()
    model.train()
    for step in range(40):
        idx = torch.arange(step * 256, step * 256 + 256) % len(y)
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x_s[idx], x_d[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.7 * before, (name, before, after)


def tiny_project(tmp_path: Path, census_small_raw: Path, extra_profiles: dict | None = None,
                 trees: list[dict] | None = None, **profile_overrides) -> tuple[Path, Path]:
    """A params.yaml pointing every output into tmp_path (``trees``: tree members added to its pool), and a harness
    config beside it with a 2-seed tiny benchmark profile: (params, config)."""
    raw_root = tmp_path / "raw"
    raw_root.mkdir(parents=True)
    (raw_root / "census-income").symlink_to(census_small_raw)
    small = {"hidden": [32, 16], "tower": [8]}
    params = {
        "paths": {"raw_root": str(raw_root), "artifacts": str(tmp_path / "artifacts")},
        "tracking": {"store": str(tmp_path / "mlruns"), "log_models": False},
        "pretrain": {"train": {"batch_size": 512, "max_epochs": 2, "lr": 0.01}, "pool": {"census-income": [
            {"name": "income-mlp", "task": "income", "arch": "mlp", **small},
            {"name": "income-dcn", "task": "income", "arch": "dcn", "cross_layers": 1, **small},
            {"name": "marital-mlp", "task": "marital", "arch": "mlp", **small}, *(trees or [])]}},
        "fuse": {"train": {"batch_size": 512, "max_epochs": 2, "lr": 0.01},  # tiny data: few steps
                 **({"output": "donor_residual"} if trees else {})},  # tree members join a donor head's blend
    }
    harness = {
        "benchmark": {"out": str(tmp_path / "results"), "workers": 2, "profile": "tiny", "profiles": {"tiny": {
            "seeds": [1, 2], "raw_rows": 3000, "max_epochs": 2,
            "task_sets": {"census-income": [["income", "marital", "sex"]]}, "task_set_methods": ["mmoe"],
            **profile_overrides}, **(extra_profiles or {})}},
    }
    path, config = tmp_path / "params.yaml", tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(params))
    config.write_text(yaml.safe_dump(harness))
    return path, config


def test_tiny_benchmark_writes_tables_plots_and_one_mlflow_parent(tmp_path: Path, census_small_raw: Path) -> None:
    from mlflow.tracking import MlflowClient

    from harness.experiments.runner import run_benchmark
    from emm.tracking.store import configure

    extra = {"seeds": [1, 2], "raw_rows": 3000, "max_epochs": 2, "jobs_from": "tiny", "baselines": [],
             "ablations": ["full"], "recipes": {"distill": {"distill": 0.5}}}
    params, config = tiny_project(tmp_path, census_small_raw, extra_profiles={"extra": extra})
    run = run_benchmark("census-income", params, config=config)
    out = tmp_path / "results" / "census-income"
    assert run.out_dir == out

    table1 = (out / "table1.md").read_text()
    for row in ["income-mlp", "income-dcn", "marital-mlp", "single-task mean", "best single-task donor",
                "SharedBottom", "MMoE", "PLE", "AITM", "AdaTT", "LightGBM (one per task)", "**EMM (fused)**"]:
        assert f"| {row} |" in table1, row
    assert "train 3,000 / val 1,50" in table1 and " / test 1,49" in table1
    assert " ± " in table1                      # two seeds -> a spread
    assert "0.94108" in table1 and "0.99467" in table1  # the paper's EMM row beside ours
    assert "## Verdict" in table1

    with open(out / "table1.csv") as fh:
        rows = list(csv.DictReader(fh))
    emm_rows = {r["task"]: r for r in rows if r["kind"] == "emm"}
    assert set(emm_rows) == {"income", "marital"} and all(r["seeds"] == "2" for r in emm_rows.values())
    assert all(0.5 < float(r["auc_mean"]) <= 1.0 for r in emm_rows.values()), emm_rows

    check_donor_rows_and_paired_cis(run, out, table1, rows)

    table2 = (out / "table2.md").read_text()
    for variant in ["| baseline |", "| baseline+MTM |", "| baseline+p (trained components) |", "| EMM (fused) |"]:
        assert variant in table2

    figure3 = (out / "figure3.md").read_text()
    assert "3 tasks: income, marital, sex" in figure3 and "| MMoE |" in figure3 and "| EMM (fused) |" in figure3
    # each task set's own paired CIs (its seed, its test rows), after its table: EMM against its best donor and MMoE
    three = figure3.split("## 3 tasks", 1)[1]
    assert "### EMM against the bars it must clear: paired 95% CIs" in three
    assert "| EMM − best donor by validation AUC | " in three and "| sex diff [95% CI] |" in three
    assert "— (1 seed)" in three  # one seed has no seed spread: said, not printed as 0
    selection = (out / "selection.md").read_text()
    assert "| sex picks" in selection or "sex picks" in selection
    for png in ["table1.png", "figure3.png", "selection.png"]:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png

    with open(out / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    main = [r for r in runs if r["task_set"] == "income+marital"]
    assert {r["seed"] for r in main} == {"1", "2"}
    assert len([r for r in runs if r["task_set"] == "income+marital+sex"]) > 0

    configure(tmp_path / "mlruns")
    client = MlflowClient()
    exp = client.get_experiment_by_name("emm-census-income")
    parents = client.search_runs([exp.experiment_id], "attributes.run_name = 'benchmark-tiny'")
    assert len(parents) == 1
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    trained = [r for r in run.results if r["kind"] != "decompose"]
    assert len(children) == len(trained)
    emm_child = next(c for c in children if c.data.params["method"] == "full" and c.data.params["seed"] == "1"
                     and c.data.params["task_set"] == "income+marital")
    assert 0.5 < emm_child.data.metrics["test_auc_income"] <= 1.0

    # A second run reuses every finished job: identical numbers, all children tagged cached.
    again = run_benchmark("census-income", params, config=config)
    assert [r["tasks"] for r in again.results] == [r["tasks"] for r in run.results]
    parents = client.search_runs([exp.experiment_id], "attributes.run_name = 'benchmark-tiny'",
                                 order_by=["attributes.start_time DESC"])
    second = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert {c.data.tags["emm.benchmark.cached"] for c in second} == {"True"}

    # A profile of one more recipe in the tiny profile's job store trains that recipe and nothing else,
    # and recipes.md pairs it with the default recipe on the same test rows.
    more = run_benchmark("census-income", params, config=config, profile="extra")
    assert more.out_dir == out / "extra" and not (tmp_path / "results" / "census-income" / "raw" / "extra").exists()
    parents = client.search_runs([exp.experiment_id], "attributes.run_name = 'benchmark-extra'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    cached = {(c.data.params["kind"], c.data.params["method"], c.data.params["seed"]):
              c.data.tags["emm.benchmark.cached"] for c in children}
    assert {k for k, v in cached.items() if v == "False"} == {("recipe", "distill", "1"), ("recipe", "distill", "2")}
    assert ("pool", "income-mlp", "1") in cached and ("lightgbm", "lightgbm", "2") in cached
    recipes = (out / "extra" / "recipes.md").read_text()
    assert "income − default [95% CI]" in recipes
    distill_row = next(line for line in recipes.splitlines() if line.startswith("| distill |"))
    assert len(re.findall(r"[+-]\d\.\d{5} \[[+-]\d\.\d{5}, [+-]\d\.\d{5}\]", distill_row)) == 2, distill_row


def check_donor_rows_and_paired_cis(run, out: Path, table1: str, rows: list[dict[str, str]]) -> None:
    """The donor ensemble/stack rows and EMM's paired CIs, recomputed from the per-row scores the jobs stored."""
    for row in ["donor ensemble (mean of logits)", "donor stack (logistic regression on validation logits)",
                "hybrid: EMM + LightGBM (stack on validation scores)", "EMM − best donor by validation AUC",
                "EMM − donor ensemble", "EMM − donor stack", "EMM − best baseline by validation AUC",
                "hybrid − LightGBM", "hybrid − donors' hybrid"]:
        assert f"| {row} |" in table1, row
    assert "income diff [95% CI]" in table1 and "marital seed std" in table1
    assert "- income: EMM − donor ensemble = " in table1 and ", 95% CI [" in table1  # and in the verdict
    main = [r for r in run.results if r["task_set"] == "income+marital"]
    schema = Schema.load(Path(main[0]["data_dir"]))
    y = load_split(Path(main[0]["data_dir"]), "test", schema).labels.numpy()
    for r in main:
        if r["kind"] in ("pool", "fused", "lightgbm"):  # what the stacks are fitted on
            assert np.load(r["scores"]["val"]).shape[1] == len(r["score_tasks"]), (r["kind"], r["method"])
        if r["kind"] in ("pool", "baseline", "fused", "lightgbm"):
            test = np.load(r["scores"]["test"])
            assert test.dtype == np.float32 and test.shape == (len(y), len(r["score_tasks"]))
            assert Path(r["scores"]["test"]).with_suffix("").with_suffix(".json").exists()  # beside the result json
            for j, task in enumerate(r["score_tasks"]):  # the stored rows are those behind the table's AUCs
                assert roc_auc_score(y[:, schema.task_names.index(task)], test[:, j]) == pytest.approx(
                    r["tasks"][task]["test_auc"], abs=1e-6), (r["kind"], r["method"], task)

    def scores(kind: str, method: str, seed: int, task: str) -> np.ndarray:
        r = next(r for r in main if (r["kind"], r["method"], r["seed"]) == (kind, method, seed))
        return np.load(r["scores"]["test"])[:, r["score_tasks"].index(task)]

    donors = {t: [r["method"] for r in main if r["kind"] == "pool" and r["seed"] == 1 and r["score_tasks"] == [t]]
              for t in schema.task_names}
    by_key = {(r["model"], r["task"]): r for r in rows}
    for i, task in enumerate(schema.task_names):
        ens = [roc_auc_score(y[:, i], np.mean([scores("pool", m, s, task) for m in donors[task]], axis=0))
               for s in (1, 2)]
        cell = by_key[("donor ensemble (mean of logits)", task)]
        assert cell["kind"] == "donors" and cell["seeds"] == "2"
        assert float(cell["auc_mean"]) == pytest.approx(np.mean(ens), abs=1e-5)
        assert 0.5 < float(by_key[("donor stack (logistic regression on validation logits)", task)]["auc_mean"]) <= 1
        val = {m: np.mean([r["tasks"][task]["val_auc"] for r in main if r["kind"] == "pool" and r["method"] == m])
               for m in donors[task]}
        best = max(val, key=val.get)  # by validation AUC
        ci = by_key[("EMM − best donor by validation AUC", task)]
        assert ci["kind"] == "paired_ci" and ci["against"] == best and ci["seeds"] == "2" and ci["n_resamples"] == "1000"
        per_seed = [roc_auc_score(y[:, i], scores("fused", "full", s, task)) -
                    roc_auc_score(y[:, i], scores("pool", best, s, task)) for s in (1, 2)]
        assert float(ci["diff"]) == pytest.approx(np.mean(per_seed), abs=1e-6)
        assert float(ci["diff_seed_std"]) == pytest.approx(np.std(per_seed, ddof=1), abs=1e-6)
        hybrid = by_key[("hybrid: EMM + LightGBM (stack on validation scores)", task)]
        assert hybrid["kind"] == "hybrid" and hybrid["seeds"] == "2" and 0.5 < float(hybrid["auc_mean"]) <= 1
        assert by_key[("hybrid − LightGBM", task)]["kind"] == "paired_ci"
        for label in ("EMM − best donor by validation AUC", "EMM − donor ensemble", "EMM − donor stack",
                      "EMM − best baseline by validation AUC", "hybrid − LightGBM", "hybrid − donors' hybrid"):
            ci = by_key[(label, task)]
            assert float(ci["ci_low"]) <= float(ci["diff"]) <= float(ci["ci_high"]), ci
            assert float(ci["ci_high"]) - float(ci["ci_low"]) > 0, ci


def test_emm_benchmark_quick_is_the_harness_command_on_emms_cli(tmp_path: Path, census_small_raw: Path) -> None:
    """`emm benchmark DATASET --quick` reaches the harness through emm's CLI (the `emm.commands` entry point):
    --quick runs the config's `quick` profile into results/<dataset>/quick/, here on a pool with a LightGBM member
    (Table I's "EMM with tree donors" beside EMM on the networks alone, with their paired CIs); an old params file
    that still carries the `benchmark:` section is refused with where it went."""
    from typer.testing import CliRunner

    from emm.cli import app

    quick = {"seeds": [1], "raw_rows": 3000, "max_epochs": 1, "baselines": ["mmoe"], "ablations": ["full"],
             "lightgbm": True}
    params, config = tiny_project(tmp_path, census_small_raw, extra_profiles={"quick": quick},
                                  trees=[{"name": "income-lgbm", "task": "income", "arch": "lightgbm"}])
    out = CliRunner().invoke(app, ["benchmark", "census-income", "--quick", "--no-track", "--params", str(params),
                                   "--config", str(config)])
    assert out.exit_code == 0, out.output
    for row in ["**EMM with tree donors**", "EMM (fused, networks only)", "income-lgbm", "MMoE",
                "EMM with tree donors − EMM networks only", "EMM with tree donors − LightGBM",
                "EMM with tree donors − best donor by validation AUC"]:
        assert f"| {row} |" in out.output, row
    assert (tmp_path / "results" / "census-income" / "quick" / "table1.md").exists()
    seed = tmp_path / "results" / "census-income" / "raw" / "quick" / "income+marital" / "seed-1"
    assert (seed / "pool" / "income-lgbm.txt").is_file() and not (seed / "pool-networks" / "income-lgbm.txt").exists()
    fused = read_json(seed / "work" / "fused-full" / "fused" / "fused.json")
    alone = read_json(seed / "work" / f"fused-{NETWORKS_EMM}" / "fused" / "fused.json")
    assert "income-lgbm" in fused["blend_init"]["income"]  # the tree is one more column of income's donor blend
    assert "income-lgbm" not in json.dumps(alone)

    old = tmp_path / "old-params.yaml"
    old.write_text(yaml.safe_dump({**yaml.safe_load(params.read_text()), **yaml.safe_load(config.read_text())}))
    refused = CliRunner().invoke(app, ["benchmark", "census-income", "--quick", "--params", str(old)])
    assert refused.exit_code == 2 and "harness/benchmark.yaml" in refused.output, refused.output


def test_unknown_profile_and_baseline_are_refused(tmp_path: Path, census_small_raw: Path) -> None:
    from harness.experiments.runner import run_benchmark

    params, config = tiny_project(tmp_path, census_small_raw)
    with pytest.raises(EMMError, match="profile 'nope'"):
        run_benchmark("census-income", params, config=config, profile="nope", track=False)
    bad, bad_config = tiny_project(tmp_path / "bad", census_small_raw, baselines=["mmoe", "transformer"])
    with pytest.raises(EMMError, match=r"unknown baseline\(s\) \['transformer'\]"):
        run_benchmark("census-income", bad, config=bad_config, track=False)
    assert not (tmp_path / "bad" / "results").exists()  # refused before any work
