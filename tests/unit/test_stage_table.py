"""dvc.yaml and the stage table behind Prefect's cache keys must describe the same inputs.

Why: the two decide "is this stage already done?" for DVC and for the Prefect flow. When they drift
(a dep listed in one and not the other), one driver reruns a stage the other silently reuses.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from emm.pipeline.cache import CODE_ROOT, STAGES

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = "artifacts/${pipeline.dataset}/"


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _outs(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", []) + stage.get("metrics", [])]


def test_every_dvc_stage_is_in_the_table_and_back():
    assert set(_dvc_stages()) == set(STAGES) - {"pretrain-model"}


def test_code_deps_agree():
    for name, stage in _dvc_stages().items():
        code = {d for d in stage["deps"] if d.startswith("emm/")}
        assert code == set(STAGES[name].code), name
        for path in code:
            assert (CODE_ROOT / path).exists(), f"{name}: dvc.yaml dep {path} does not exist"


def test_artifact_deps_agree_and_chain_through_the_upstream():
    for name, stage in _dvc_stages().items():
        reads = {d[len(ARTIFACTS):].split("/")[0] for d in stage["deps"] if d.startswith(ARTIFACTS)}  # a file dep
        # (eval/metrics.json) counts as its stage folder
        assert reads == set(STAGES[name].reads), name
        upstream = STAGES[name].upstream
        if upstream is not None:  # the cache key chains the upstream key: its folder must be one it reads
            assert STAGES[upstream].marker.split("/")[0] in reads, name


def test_params_agree():
    for name, stage in _dvc_stages().items():
        table = {p.split(".")[0] for p in STAGES[name].params}
        dvc = set(stage.get("params", [])) - {"pipeline"}  # pipeline.dataset only names the folders in dvc.yaml
        assert dvc == table, name


def test_markers_live_in_the_stage_outputs():
    for name, stage in _dvc_stages().items():
        folder = STAGES[name].marker.split("/")[0]
        assert any(o.startswith(ARTIFACTS + folder) for o in _outs(stage)), name


def test_every_stage_that_rebuilds_pool_models_reruns_when_their_code_changes():
    """decompose traces the pool members rebuilt from emm/models, and the fused model holds copies of
    their layers and a fresh embedding from emm/models: a change there must rerun both, under DVC and Prefect."""
    for name in ("pretrain", "decompose", "fuse", "evaluate"):
        assert "emm/models" in STAGES[name].code, name
        assert "emm/models" in _dvc_stages()[name]["deps"], name
