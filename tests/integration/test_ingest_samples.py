"""AliExpress and Ali-CCP in their published CSV layouts (real samples; the code is the full-size path)."""

from __future__ import annotations

import pytest

from emm.data.ingest import ingest
from emm.data.options import IngestConfig
from emm.data.spec import resolve_dataset
from emm.errors import EMMError


def test_aliexpress_sample(shared_data, tmp_path):
    # the published 100-row sample has no conversion in its 10-row val split: refused, naming split and task
    with pytest.raises(EMMError, match=r"conversion.*val|val.*conversion"):
        ingest(resolve_dataset("aliexpress"), shared_data / "aliexpress", tmp_path / "ae", IngestConfig())
    assert not (tmp_path / "ae").exists()
    schema = ingest(resolve_dataset("aliexpress"), shared_data / "aliexpress", tmp_path / "ae", IngestConfig(),
                    ["click"])
    assert schema.n_sparse == 16 and schema.n_dense == 63
    assert schema.task_names == ["click"]
    assert "search_id" not in [f.name for f in schema.sparse]
    # 10% of the 100 train rows carved into val, stratified by click (60 clicks / 40 not)
    assert schema.rows == {"train": 90, "val": 10, "test": 20}
    clicks = {t.name: t.positives for t in schema.tasks}["click"]
    assert clicks["val"] == 6 and clicks["train"] == 54 and clicks["test"] == 10


def test_ali_ccp_sample(shared_data, tmp_path):
    schema = ingest(resolve_dataset("ali-ccp"), shared_data / "ali-ccp", tmp_path / "ccp", IngestConfig())
    assert schema.n_sparse == 23 and schema.n_dense == 8
    assert schema.rows == {"train": 100, "val": 50, "test": 50}
    pos = {t.name: t.positives for t in schema.tasks}
    assert pos["click"] == {"train": 7, "val": 3, "test": 2}
    assert pos["purchase"] == {"train": 1, "val": 1, "test": 1}
    names = [f.name for f in schema.sparse] + [f.name for f in schema.dense]
    assert "click" not in names and "purchase" not in names
