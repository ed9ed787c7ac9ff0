"""Ingestion of real Census-Income rows: counts, label rates, schema, leakage rules, determinism."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from emm.pipeline.params import IngestConfig
from emm.data.encoding import Encoder
from emm.data.ingest import ingest
from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.data.tensors import load_split

DENSE = ["age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked"]


def raw_rates(path, rows):
    with gzip.open(path, "rt") as fh:
        lines = [next(fh) for _ in range(rows)]
    income = np.mean([line.rstrip().endswith("50000+.") for line in lines])
    marital = np.mean([line.split(", ")[7] == "Never married" for line in lines])
    return income, marital


def test_slice_counts_rates_and_schema(census_small_raw, census_small_data):
    schema = Schema.load(census_small_data)
    assert schema.rows["train"] == 6000
    # 1:1 carve of 3,000 test rows, rounded per income stratum (each stratum may add one row to val)
    assert schema.rows["val"] + schema.rows["test"] == 3000 and 0 <= schema.rows["val"] - schema.rows["test"] <= 2
    assert schema.task_names == ["income", "marital"]
    names = [f.name for f in schema.sparse]
    raw_sparse = [f.name for f in schema.sparse if f.bucket_of is None]
    assert len(raw_sparse) == 32 and [f.name for f in schema.dense] == DENSE
    # dense_buckets: 32 in the declaration -> one bucket feature per dense column, after the raw ones
    assert names[32:] == [f"{c}_bucket" for c in DENSE]
    for forbidden in ("marital_stat", "income_50k", "instance_weight"):
        assert forbidden not in names
    # label rates equal the raw file's, counted independently
    income, marital = raw_rates(census_small_raw / "census-income.data.gz", 6000)
    rates = {t.name: t.positive_rate["train"] for t in schema.tasks}
    assert rates["income"] == pytest.approx(income) and rates["marital"] == pytest.approx(marital)
    assert "train+test" in schema.encoding["note"]
    assert len(schema.raw_files) == 2 and all(len(f.sha256) == 64 for f in schema.raw_files)
    # offsets tile one shared table; index 0 of each block is the reserved 'unseen' slot
    assert schema.sparse[0].offset == 0
    for a, b in zip(schema.sparse, schema.sparse[1:]):
        assert b.offset == a.offset + a.vocab_size


def test_val_test_carve_is_stratified_and_exact(census_small_data):
    schema = Schema.load(census_small_data)
    pos = {t.name: t.positives for t in schema.tasks}["income"]
    total = pos["val"] + pos["test"]
    assert abs(pos["val"] - pos["test"]) <= 1 and total > 0


def test_encoded_values_and_tensors(census_small_data):
    schema = Schema.load(census_small_data)
    frame = pq.read_table(census_small_data / "train.parquet").to_pandas()
    dense = frame[DENSE].to_numpy()
    assert dense.min() >= 0.0 and dense.max() <= 1.0
    sparse = frame[[f.name for f in schema.sparse]].to_numpy()
    # vocab fitted on train+test: nothing in train is 'unseen'
    assert sparse.min() >= 1
    assert all(sparse[:, j].max() < f.vocab_size for j, f in enumerate(schema.sparse))
    t = load_split(census_small_data, "val", schema)
    assert t.sparse.dtype.is_floating_point is False and t.sparse.shape == (schema.rows["val"], 39)
    assert t.dense.shape == (schema.rows["val"], 7) and t.labels.shape == (schema.rows["val"], 2)
    assert int(t.sparse.max()) < schema.total_vocab


def test_unseen_category_maps_to_reserved_index(census_small_data):
    schema = Schema.load(census_small_data)
    enc = Encoder.load(census_small_data, schema)
    frame = pq.read_table(census_small_data / "test.parquet").to_pandas().head(3)
    categorical = [f.name for f in schema.sparse if f.bucket_of is None]
    raw = pd.DataFrame({name: ["never-seen-value"] * 3 for name in categorical})
    for f in schema.dense:
        raw[f.name] = ["1e12", "-5", "30"]
    out = enc.transform(raw, source="test", first_line=None)
    assert (out[categorical].to_numpy() == 0).all()
    assert out["age"].tolist()[:2] == [1.0, 0.0]  # clipped to the fitted range
    age = next(f for f in schema.sparse if f.bucket_of == "age")
    # out-of-range values land in the outer bins, never in the 'unseen' slot
    assert out["age_bucket"].tolist()[:2] == [age.vocab_size - 1, 1]
    assert len(frame) == 3


def test_same_seed_same_split(census_small_raw, census_small_data, tmp_path):
    again = tmp_path / "again"
    ingest(resolve_dataset("census-income"), census_small_raw, again, IngestConfig())
    for split in ("train", "val", "test"):
        a = pq.read_table(census_small_data / f"{split}.parquet").to_pandas()
        b = pq.read_table(again / f"{split}.parquet").to_pandas()
        pd.testing.assert_frame_equal(a, b)


def test_chunking_does_not_change_the_result(census_small_raw, census_small_data, tmp_path):
    """Tiny blocks (many chunks) give the same vocabularies, scaling and row assignment counts."""
    small = tmp_path / "small-blocks"
    cfg = IngestConfig(block_mb=1)
    ingest(resolve_dataset("census-income"), census_small_raw, small, cfg)
    a, b = Schema.load(census_small_data), Schema.load(small)
    assert a.sparse == b.sparse and a.dense == b.dense and a.rows == b.rows
    train_a = pq.read_table(census_small_data / "train.parquet").to_pandas()
    train_b = pq.read_table(small / "train.parquet").to_pandas()
    pd.testing.assert_frame_equal(train_a, train_b)


def test_extra_tasks_remove_their_columns_from_features(census_small_raw, tmp_path):
    out = tmp_path / "four"
    schema = ingest(resolve_dataset("census-income"), census_small_raw, out, IngestConfig(),
                    tasks=["income", "marital", "sex", "education"])
    names = [f.name for f in schema.sparse]
    assert "sex" not in names and "education" not in names and len(names) == 30 + len(DENSE)
    assert schema.task_names == ["income", "marital", "sex", "education"]
    rates = {t.name: t.positive_rate["train"] for t in schema.tasks}
    assert 0.45 < rates["sex"] < 0.6 and 0.05 < rates["education"] < 0.3


def test_bucket_features_match_the_raw_values(census_small_raw, census_small_data):
    """Every row's bin holds its raw dense value; zero-inflated columns keep resolution above zero."""
    schema = Schema.load(census_small_data)
    enc = Encoder.load(census_small_data, schema)
    frame = pq.read_table(census_small_data / "train.parquet").to_pandas()
    raw = enc.decode(frame)
    for f in (f for f in schema.sparse if f.bucket_of is not None):
        edges = np.array(f.edges)
        assert np.all(np.diff(edges) > 0) and f.vocab_size == len(edges) + 2
        bins = frame[f.name].to_numpy()
        x = raw[f.bucket_of].to_numpy()
        lower = np.concatenate([[-np.inf], edges])[bins - 1]
        upper = np.concatenate([edges, [np.inf]])[bins - 1]
        dense = next(d for d in schema.dense if d.name == f.bucket_of)
        tol = 1e-5 * (dense.max - dense.min)  # decoded from float32 scaled values
        assert np.all((lower < x + tol) & (x <= upper + tol)), f.name
    gains = next(f for f in schema.sparse if f.bucket_of == "capital_gains")
    assert gains.edges[0] == 0.0 and len(gains.edges) > 5  # zeros get their own bin, the rest is resolved
    vocab = pq.read_table(census_small_data / "vocabulary.parquet").to_pandas()
    assert vocab[vocab.feature == "capital_gains_bucket"]["value"].iloc[0] == "<= 0"


def test_buckets_off_and_bad_declarations(census_small_raw, census_small_data, tmp_path):
    spec = resolve_dataset("census-income").model_copy(update={"dense_buckets": 0})
    schema = ingest(spec, census_small_raw, tmp_path / "off", IngestConfig())
    assert all(f.bucket_of is None for f in schema.sparse) and len(schema.sparse) == 32
    # a model trained with buckets is refused on data without them (and the other way round)
    assert schema.fingerprint() != Schema.load(census_small_data).fingerprint()
    with pytest.raises(ValueError, match="dense_buckets: 1"):
        type(spec).model_validate({**spec.model_dump(), "dense_buckets": 1})


def test_a_declared_dataset_gets_buckets_without_asking(census_small_raw, census_small_data, tmp_path):
    """A user's declaration that never mentions dense_buckets still gets the numeric encoding."""
    declared = resolve_dataset("census-income").model_dump(exclude={"dense_buckets"})
    spec = type(resolve_dataset("census-income")).model_validate({**declared, "name": "my-census"})
    schema = ingest(spec, census_small_raw, tmp_path / "declared", IngestConfig())
    assert [f.bucket_of for f in schema.sparse if f.bucket_of] == DENSE
    assert len({f.vocab_size for f in schema.sparse if f.bucket_of}) > 1  # real bins, fitted per column


@pytest.mark.slow
def test_full_census_ingestion(shared_data, tmp_path):
    out = tmp_path / "full"
    schema = ingest(resolve_dataset("census-income"), shared_data / "census-income", out, IngestConfig())
    assert schema.rows == {"train": 199_523, "val": 49_881, "test": 49_881}
    pos = {t.name: t.positives for t in schema.tasks}
    assert pos["income"]["train"] == 12_382
    assert pos["income"]["val"] + pos["income"]["test"] == 6_186
    assert pos["income"]["val"] == pos["income"]["test"] == 3_093
    assert pos["marital"]["train"] == 86_485
    assert schema.total_vocab > 400
