"""A registry version is tagged and aliased completely, or removed: never left half-registered."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest


def test_failed_tagging_deletes_the_version(tmp_path: Path) -> None:
    from emm.tracking import registry as mt
    from emm.tracking.store import configure

    configure(tmp_path / "mlruns")
    client = mlflow.MlflowClient()
    client.create_registered_model("emm-test")
    good = client.create_model_version("emm-test", source=str(tmp_path), run_id=None)
    mt.tag_version("emm-test", good.version, {mt.SCORE_TAG: "0.9"})
    assert client.get_model_version_by_alias("emm-test", mt.CHALLENGER).version == good.version

    bad = client.create_model_version("emm-test", source=str(tmp_path), run_id=None)
    with pytest.raises(Exception):
        mt.tag_version("emm-test", bad.version, {mt.SCORE_TAG: "0.95", "x" * 300: "too long a key"})
    versions = {v.version for v in client.search_model_versions("name='emm-test'")}
    assert versions == {good.version}  # the half-tagged version is gone, the good one untouched
    assert client.get_model_version_by_alias("emm-test", mt.CHALLENGER).version == good.version
