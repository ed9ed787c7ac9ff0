"""`emm evaluate`'s summary leads with what fusion added over the donor stack (issue 24): per task the
paired CI of fused − donor stack and a plain verdict, before the AUCs and the Gain over the pool mean; the
same numbers become run metrics and the registered version's tags."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from emm.pipeline import register
from emm.pipeline.evaluate import summary_lines, summary_table
from emm.pipeline.register import fused_minus_stack, stack_metrics, stack_tags, stack_verdict


def _ci(diff: float, low: float, high: float, a: float = 0.9) -> dict:
    return {"diff": diff, "low": low, "high": high, "n_resamples": 1000, "confidence": 0.95, "auc_a": a,
            "auc_b": a - diff}


def _row(stack: dict, *, gain: float = 0.02, labelled: int | None = None) -> dict:
    row = {"auc": stack["auc_a"], "logloss": 0.3, "pool": {"a": 0.88, "b": 0.87}, "pool_mean_auc": 0.875,
           "pool_best_auc": 0.88, "gain": gain, "gain_pct": 100 * gain / 0.875, "vs_best_donor": 0.01,
           "donor_ensemble_auc": 0.885, "donor_stack_auc": stack["auc_b"], "best_donor_by_val": "a",
           "ci": {"fused_minus_best_donor": {**_ci(0.01, 0.002, 0.018), "donor": "a", "chosen_by": "val_auc"},
                  "fused_minus_donor_ensemble": _ci(0.005, -0.001, 0.011),
                  "fused_minus_donor_stack": stack}}
    if labelled is not None:
        row["labelled_test_rows"] = labelled
    return row


def _summary() -> dict:
    tasks = {"income": _row(_ci(0.0012, -0.0005, 0.0029, a=0.93), gain=0.031, labelled=2_000),
             "marital": _row(_ci(0.004, 0.001, 0.007, a=0.97), labelled=3_000),
             "churn": _row(_ci(-0.006, -0.009, -0.002, a=0.80), labelled=3_000)}
    return {"dataset": "census-income", "fused_minus_stack": fused_minus_stack(tasks), "rows_test": 3_000,
            "mean_test_auc": 0.9, "tasks": tasks}


@pytest.mark.parametrize(("low", "high", "verdict"), [(-0.0005, 0.0029, "no measurable gain"),
                                                      (0.0, 0.003, "no measurable gain"),
                                                      (-0.003, 0.0, "no measurable gain"),
                                                      (0.0001, 0.003, "gain"), (-0.003, -0.0001, "loss")])
def test_the_verdict_is_a_gain_only_when_the_whole_ci_is_above_zero(low: float, high: float, verdict: str) -> None:
    assert stack_verdict(low, high) == verdict


def test_the_headline_is_read_from_the_stack_ci_of_each_task() -> None:
    summary = _summary()
    head = summary["fused_minus_stack"]
    assert list(head) == ["income", "marital", "churn"]
    assert head["income"] == {"diff": 0.0012, "low": -0.0005, "high": 0.0029, "confidence": 0.95,
                              "verdict": "no measurable gain", "fused_auc": 0.93, "donor_stack_auc": 0.93 - 0.0012,
                              "labelled_test_rows": 2_000}
    assert [h["verdict"] for h in head.values()] == ["no measurable gain", "gain", "loss"]


def test_the_lines_say_plainly_when_the_ci_contains_zero() -> None:
    lines = summary_lines(_summary())
    assert lines[0] == ("income: EMM − donor stack +0.00120, 95% CI [-0.00050, +0.00290] on 2,000 labelled test "
                        "rows: no measurable gain (the CI contains 0)")
    assert lines[1].startswith("marital: EMM − donor stack +0.00400") and "a gain (the CI lies above 0)" in lines[1]
    assert "worse than the donor stack" in lines[2]


def test_the_table_leads_with_fused_minus_stack_and_keeps_the_other_columns_after_it() -> None:
    columns, rows = summary_table(_summary())
    assert columns[:3] == ["task", "EMM − donor stack, 95% CI", "verdict"]
    for old in ("EMM AUC", "donor stack", "donor ensemble", "EMM − best donor (by val), 95% CI", "pool mean",
                "pool best", "Gain vs pool mean", "Gain %", "labelled test rows"):
        assert columns.index(old) > 2, old
    income = dict(zip(columns, rows[0]))
    assert income["EMM − donor stack, 95% CI"] == "+0.00120 [-0.00050, +0.00290]"
    assert income["verdict"] == "no measurable gain"
    assert income["Gain vs pool mean"] == "+0.03100"  # the large number, still there, no longer first
    assert income["EMM − best donor (by val), 95% CI"] == "+0.01000 [+0.00200, +0.01800] vs a"
    assert income["labelled test rows"] == "2,000"
    assert [r[0] for r in rows] == ["income", "marital", "churn"]


def test_metrics_and_tags_carry_each_task_estimate_and_its_ci() -> None:
    summary = _summary()
    metrics = stack_metrics(summary)
    assert metrics["fused_minus_stack_income"] == 0.0012
    assert metrics["fused_minus_stack_income_ci_low"] == -0.0005
    assert metrics["fused_minus_stack_churn_ci_high"] == -0.002
    assert len(metrics) == 9
    tags = stack_tags(summary)
    assert tags["fused_minus_stack_income"] == "0.001200"  # as test_auc_<task>: 6 decimals
    assert tags["fused_minus_stack_income_ci_low"] == "-0.000500"
    assert tags["fused_minus_stack_income_ci_high"] == "0.002900"
    assert tags["fused_minus_stack_income_verdict"] == "no measurable gain"
    assert tags["fused_minus_stack_marital_verdict"] == "gain"
    assert all(isinstance(v, str) for v in tags.values())


class _Tracker:
    def __init__(self) -> None:
        self.metrics: dict = {}
        self.tags: dict = {}

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.update(metrics)

    def set_tags(self, tags) -> None:
        self.tags.update(tags)

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def log_model(self, name, **kwargs) -> str:
        return "7"


def test_register_fused_tags_the_new_version_and_the_run_with_the_headline(tmp_path: Path, monkeypatch) -> None:
    tracker, tagged = _Tracker(), {}
    monkeypatch.setattr(register, "read_json", lambda path: {"architecture": {}, "tasks": ["income"]})
    monkeypatch.setattr(register, "sha256_file", lambda path: "abc")
    monkeypatch.setattr(register, "reopen_run", lambda *a, **k: contextlib.nullcontext(tracker))
    monkeypatch.setattr(register.registry, "registration_lock", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(register.registry, "version_with_tag", lambda *a, **k: None)
    monkeypatch.setattr(register.registry, "tag_version", lambda name, version, tags: tagged.update(tags))
    summary = _summary()
    version = register.register_fused("census-income", tmp_path, tmp_path, tmp_path, summary,
                                      register.TrackingConfig(store=tmp_path / "mlruns"))
    assert version == "7"
    for key, value in stack_tags(summary).items():
        assert tagged[key] == value and tracker.tags[key] == value
    assert tagged[register.registry.SCORE_TAG] == "0.900000"
    assert tracker.metrics["fused_minus_stack_marital_ci_low"] == 0.001
    assert tracker.metrics["gain_income"] == 0.031  # the paper's Gain is still logged
