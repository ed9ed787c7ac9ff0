"""params.yaml and dataset declarations: typos and inconsistent declarations are errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from emm.pipeline.params import load_params
from emm.data.spec import DatasetSpec, resolve_dataset
from emm.errors import EMMError

BASE = {"name": "d", "files": {"train": "a.csv", "test": "b.csv"},
        "carve": {"source": "test", "into": ["val", "test"], "fraction": 0.5},
        "tasks": {"y": {"column": "label", "threshold": 0.5}}, "default_tasks": ["y"]}


def test_repo_params_load():
    cfg = load_params("params.yaml")
    assert cfg.ingest.tasks["census-income"] == ["income", "marital"]


def test_typo_in_section_is_an_error(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("ingest:\n  block_mbb: 4\n")
    with pytest.raises(EMMError, match=r"(?s)params file .* is invalid:.*ingest.block_mbb"):
        load_params(p)


def test_user_declaration_overrides_and_is_checked(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("datasets:\n  mine:\n    files: {train: t.csv, val: v.csv, test: s.csv}\n"
                 "    tasks: {y: {column: c, threshold: 0}}\n    default_tasks: [y]\n")
    cfg = load_params(p)
    assert resolve_dataset("mine", cfg.datasets).name == "mine"


@pytest.mark.parametrize("change, message", [
    ({"carve": None}, "must produce exactly train/val/test"),
    ({"files": {"test": "b.csv"}}, "a 'train' file is required"),
    ({"default_tasks": ["z"]}, "undeclared task"),
    ({"tasks": {"y": {"column": "label"}}}, "exactly one of positive_values or threshold"),
    ({"header": False}, "needs the list of columns"),
])
def test_inconsistent_declarations(change, message):
    with pytest.raises(ValidationError, match=message):
        DatasetSpec.model_validate({**BASE, **change})


def test_builtins_are_valid():
    for name in ("census-income", "aliexpress", "ali-ccp"):
        spec = resolve_dataset(name)
        assert len(spec.default_tasks) == 2


def test_unknown_top_level_section_is_an_error(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("fusee:\n  ablation: full\n")
    with pytest.raises(EMMError, match=r"(?s)invalid:.*fusee"):
        load_params(p)


def test_bucket_edges_do_not_depend_on_chunking(monkeypatch):
    """Priority sampling keeps the same values whether the column arrives in one chunk or many."""
    import numpy as np
    import pandas as pd

    from emm.data import encoding
    from emm.data.encoding import Encoder, bucket_edges

    monkeypatch.setattr(encoding, "BUCKET_SAMPLE", 500)  # force sampling
    rng = np.random.default_rng(0)
    x = np.where(rng.random(3000) < 0.8, 0.0, rng.exponential(1000, 3000)).round(1)
    frame = pd.DataFrame({"gain": x.astype(str)})

    def fit(chunks: int) -> list[float]:
        enc = Encoder(sparse=[], dense=["gain"], bucketed=["gain"], n_buckets=8)
        for part in np.array_split(np.arange(len(frame)), chunks):
            enc.partial_fit(frame.iloc[part], source="t", first_line=1, missing="error")
        enc.finish()
        return enc.edges["gain"]

    one, many = fit(1), fit(7)
    assert one == many
    assert one[0] == 0.0 and len(one) == 8  # the 80% zeros get a bin; 7 quantile edges above them
    assert bucket_edges(np.zeros(10), 4) == [0.0]  # a constant column: one edge, two bins


def test_pretrain_numeric_reaches_every_builtin_entry_without_its_own(tmp_path):
    """One setting for every pool model alike; an entry that sets its own encoding keeps it, and an
    outside (factory/MLflow) entry, which brings its own inputs, is left alone."""
    from emm.models.single_task import ModelSpec
    from emm.pipeline.pool_specs import with_numeric

    path = tmp_path / "params.yaml"
    path.write_text("pretrain:\n  numeric: {mode: periodic, dim: 4}\n")
    cfg = load_params(path).pretrain
    plain = ModelSpec.model_validate(with_numeric({"name": "a", "task": "t", "arch": "mlp", "hidden": [4]}, cfg))
    own = ModelSpec.model_validate(with_numeric({"name": "b", "task": "t", "arch": "mlp", "hidden": [4],
                                                 "numeric": {"mode": "minmax"}}, cfg))
    assert (plain.numeric.mode, plain.numeric.dim) == ("periodic", 4) and own.numeric.mode == "minmax"
    outside = {"name": "c", "task": "t", "factory": "pkg:build", "weights": "w.safetensors"}
    assert with_numeric(outside, cfg) is outside
    path.write_text("pretrain:\n  numeric: {mode: fourier}\n")
    with pytest.raises(EMMError, match="numeric"):
        load_params(path)


def test_a_params_file_with_the_harness_section_is_told_where_it_went(tmp_path):
    """The benchmark's settings left params.yaml for harness/benchmark.yaml: an old file is refused by name."""
    path = tmp_path / "params.yaml"
    path.write_text("benchmark:\n  workers: 2\n")
    with pytest.raises(EMMError, match=r"`benchmark:` section moved to .*harness/benchmark.yaml.*--config"):
        load_params(path)
