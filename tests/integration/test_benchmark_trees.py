"""Tree pool members (``arch: lightgbm``) in ``emm benchmark``'s plan: EMM fuses the whole pool (the trees join at
the output) and, for Table I's "EMM (fused, networks only)", the same recipe on the networks alone, each view of
the pool decomposed by its own job into its own folders; a pool without trees plans exactly what it did before."""

from __future__ import annotations

from pathlib import Path

import pytest

from emm.errors import EMMError
from harness.experiments.members import NETWORKS_EMM
from harness.experiments.runner import plan_jobs
from harness.params import BenchmarkProfile, load_harness_params

REPO = Path(__file__).resolve().parents[2]
MAIN = "income+marital"
TREES = [{"name": "income-lgbm", "task": "income", "arch": "lightgbm"},
         {"name": "marital-lgbm", "task": "marital", "arch": "lightgbm"}]
PAPER = {"output": "tower"}


def plan(data_dir: Path, tmp_path: Path, trees: list[dict], **profile) -> dict[tuple[int, str, str], object]:
    """{(seed, kind, method): job} of a 2-seed plan on the repo's params with the Census pool's networks + ``trees``."""
    cfg = load_harness_params(REPO / "params.yaml")
    networks = [s for s in cfg.pretrain.pool["census-income"] if s.get("arch") != "lightgbm"]
    pool = {"census-income": networks + trees}
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"pool": pool})})
    prof = BenchmarkProfile.model_validate({"seeds": [1, 2], "baselines": [], "ablations": ["full"], **profile})
    return {(j.seed, j.kind, j.method): j for j in plan_jobs("census-income", cfg, prof, {MAIN: data_dir}, MAIN,
                                                              tmp_path / "raw")}


def test_a_pool_with_trees_is_fused_whole_and_on_its_networks_alone(census_small_data: Path, tmp_path: Path) -> None:
    jobs = plan(census_small_data, tmp_path, TREES, recipes={"paper": {**PAPER, "members": "networks"}})
    pool = {m for (s, k, m) in jobs if s == 1 and k == "pool"}
    assert {"income-lgbm", "marital-lgbm"} <= pool and len(pool) == 6
    whole, networks = jobs[(1, "decompose", "pool")], jobs[(1, "decompose", "networks")]
    assert set(whole.needs) == {jobs[(1, "pool", m)].key for m in pool} and "members" not in whole.config
    assert set(networks.needs) == {jobs[(1, "pool", m)].key for m in pool - {"income-lgbm", "marital-lgbm"}}
    assert networks.config["members"] == "networks" and networks.config["pool_results"] == [
        str(jobs[(1, "pool", m)].result_path) for m in ("income-mlp", "income-dcn", "marital-mlp", "marital-resmlp")]

    emm, alone, recipe = jobs[(1, "fused", "full")], jobs[(1, "fused", NETWORKS_EMM)], jobs[(1, "recipe", "paper")]
    assert emm.needs == (whole.key,) and "members" not in emm.config
    assert alone.needs == (networks.key,) and alone.config["members"] == "networks"
    assert alone.config["fuse"] == emm.config["fuse"]  # the same recipe, on the networks alone
    assert recipe.needs == (networks.key,) and recipe.config["fuse"]["output"] == "tower"
    assert (2, "fused", NETWORKS_EMM) in jobs  # every seed: the paired CIs are seed-matched


def test_a_pool_without_trees_plans_what_it_did_before(census_small_data: Path, tmp_path: Path) -> None:
    plain = plan(census_small_data, tmp_path, [], recipes={"paper": PAPER})
    said = plan(census_small_data, tmp_path, [], recipes={"paper": {**PAPER, "members": "networks"}})
    assert not any(m in ("networks", NETWORKS_EMM) for (_, _, m) in plain)
    # `members: networks` on a pool of networks is the whole pool: the same jobs, the same signatures
    assert {k: j.signature("data") for k, j in said.items()} == {k: j.signature("data") for k, j in plain.items()}
    assert all("members" not in j.config for j in plain.values())
    with_trees = plan(census_small_data, tmp_path, TREES, recipes={"paper": PAPER})
    for key, job in plain.items():  # the networks' own jobs are reused when trees join the pool
        if key[1] in ("pool", "lightgbm"):
            assert with_trees[key].signature("data") == job.signature("data"), key


def test_an_unknown_members_view_is_refused_before_any_work(tmp_path: Path, census_small_raw: Path) -> None:
    from harness.experiments.runner import parse_builtin, run_benchmark
    from tests.integration.test_benchmark import tiny_project

    params, config = tiny_project(tmp_path, census_small_raw, recipes={"paper": {**PAPER, "members": "trees"}})
    with pytest.raises(EMMError, match="recipe 'paper': members 'trees' is not one of"):
        run_benchmark("census-income", params, config=config, track=False)
    assert not (tmp_path / "results").exists()
    with pytest.raises(EMMError, match="outside model"):  # a tree file is trained once, not per seed: refused
        parse_builtin({"name": "income-file", "task": "income", "lightgbm": "m.txt"}, "pretrain.pool.x[0]")


def test_figure3_task_sets_give_their_new_tasks_the_pools_tree_kinds(census_small_data: Path, census_three_task_schema,
                                                                     tmp_path: Path) -> None:
    """A task the 2-task pool has no model for (Figure 3's sex) gets two default networks and a copy of each
    LightGBM kind of the configured pool (categories, integer codes), and EMM on the networks alone beside EMM."""
    three = tmp_path / "three"  # planning reads a task set's schema only
    census_three_task_schema.save(three)
    cfg = load_harness_params(REPO / "params.yaml")  # the repo's default pool: two LightGBM kinds per task
    prof = BenchmarkProfile.model_validate({"seeds": [1, 2], "baselines": [], "ablations": ["full"],
                                            "task_sets": {"census-income": [["income", "marital", "sex"]]},
                                            "task_set_methods": [], "lightgbm": True})
    jobs = plan_jobs("census-income", cfg, prof, {MAIN: census_small_data, "income+marital+sex": three}, MAIN,
                     tmp_path / "raw")
    extra = {(j.kind, j.method): j for j in jobs if j.task_set == "income+marital+sex"}
    assert {j.seed for j in jobs if j.task_set == "income+marital+sex"} == {1}  # task_set_seeds: the first seed
    sex = {m: j.config["spec"] for (k, m), j in extra.items() if k == "pool" and m.startswith("sex-")}
    assert set(sex) == {"sex-mlp", "sex-dcn", "sex-lgbm", "sex-lgbm-codes"}, sex
    assert sex["sex-lgbm"]["arch"] == sex["sex-lgbm-codes"]["arch"] == "lightgbm"
    assert sex["sex-lgbm"]["categorical"] is not False and sex["sex-lgbm-codes"]["categorical"] is False
    assert sex["sex-lgbm"]["task"] == "sex"
    assert ("fused", "full") in extra and ("fused", NETWORKS_EMM) in extra and ("lightgbm", "lightgbm") in extra
    assert extra[("fused", NETWORKS_EMM)].config["members"] == "networks"
    # the 2-task set plans what it plans without the extra task sets: its finished jobs are reused
    alone = plan_jobs("census-income", cfg, prof.model_copy(update={"task_sets": {}}), {MAIN: census_small_data},
                      MAIN, tmp_path / "raw")
    assert {j.key: j.signature("d") for j in alone} == {
        j.key: j.signature("d") for j in jobs if j.task_set == MAIN}


def test_tree_kinds_are_distinct_settings_under_distinct_names() -> None:
    from harness.experiments.runner import tree_kinds

    pool = [{"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [8]},
            {"name": "income-lgbm", "task": "income", "arch": "lightgbm"},
            {"name": "marital-lgbm", "task": "marital", "arch": "lightgbm"},  # the same kind: once
            {"name": "marital-lgbm-codes", "task": "marital", "arch": "lightgbm", "categorical": False},
            {"name": "my-trees", "task": "income", "arch": "lightgbm", "rounds": 50},  # no task prefix: whole name
            {"name": "sex-lgbm", "task": "sex", "arch": "lightgbm", "learning_rate": 0.1}]  # "lgbm" is taken
    assert tree_kinds(pool) == [("lgbm", {"arch": "lightgbm"}),
                                ("lgbm-codes", {"arch": "lightgbm", "categorical": False}),
                                ("my-trees", {"arch": "lightgbm", "rounds": 50}),
                                ("lgbm-4", {"arch": "lightgbm", "learning_rate": 0.1})]
