"""Ingest with missing labels: declared missing values, ``ingest.label_fraction``, the refusals that protect AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emm.data.ingest import ingest
from emm.data.labels import keep_mask
from emm.data.options import IngestConfig
from emm.data.schema import Schema
from emm.data.spec import DatasetSpec, resolve_dataset
from emm.data.stream import ParquetStream
from emm.data.tensors import load_split
from emm.errors import EMMError

CENSUS = resolve_dataset("census-income")
# the fingerprint of the census_small_data slice as computed before labels could be missing: it must not move
CENSUS_SMALL_FINGERPRINT = "29fad2f1822f5aca"


def toy_frame(n: int, seed: int, labelled_share: float) -> pd.DataFrame:
    """A rich task labelled everywhere and a scarce one whose label cell is empty on most rows."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    cat = rng.choice(list("abcde"), n)
    rich = np.where(x + rng.normal(size=n) > 0, "yes", "no")
    scarce = np.where(x + (cat == "a") + rng.normal(size=n) > 0.5, "1", "0").astype(object)
    scarce[rng.random(n) >= labelled_share] = ""
    return pd.DataFrame({"x": x.round(4), "cat": cat, "rich": rich, "scarce": scarce})


def declare(**update) -> DatasetSpec:
    return DatasetSpec.model_validate({
        "name": "partial", "files": {"train": "train.csv", "val": "val.csv", "test": "test.csv"},
        "dense": ["x"], "sparse": ["cat"], "dense_buckets": 0,
        "tasks": {"rich": {"column": "rich", "positive_values": ["yes"], "negative_values": ["no"]},
                  "scarce": {"column": "scarce", "positive_values": ["1"], "negative_values": ["0"],
                             "missing_values": [""]}},
        "default_tasks": ["rich", "scarce"], **update,
    })


def write_raw(folder: Path, val_share: float = 0.2) -> Path:
    folder.mkdir()
    toy_frame(3000, 1, 0.2).to_csv(folder / "train.csv", index=False)
    toy_frame(800, 2, val_share).to_csv(folder / "val.csv", index=False)
    toy_frame(800, 3, 1.0).to_csv(folder / "test.csv", index=False)
    return folder


def test_declared_missing_labels_ingest_as_nulls(tmp_path):
    raw = write_raw(tmp_path / "raw")
    schema = ingest(declare(), raw, tmp_path / "out", IngestConfig())
    info = {t.name: t for t in schema.tasks}
    for split in ("train", "val", "test"):
        source = pd.read_csv(raw / f"{split}.csv", keep_default_na=False, dtype=str)
        has = (source["scarce"] != "").to_numpy()
        table = pq.read_table(tmp_path / "out" / f"{split}.parquet")
        col = table.column("scarce")
        assert col.type == pa.int8() and table.column("rich").type == pa.int8()
        np.testing.assert_array_equal(col.is_valid().to_numpy(zero_copy_only=False), has)
        np.testing.assert_array_equal(col.to_numpy(zero_copy_only=False)[has],
                                      (source["scarce"][has] == "1").to_numpy())
        assert info["scarce"].labelled[split] == schema.labelled_rows("scarce", split) == int(has.sum())
        assert info["scarce"].positives[split] == int((source["scarce"] == "1").sum())
        assert info["scarce"].positive_rate[split] == pytest.approx(info["scarce"].positives[split] / has.sum())
        assert info["rich"].labelled[split] == schema.rows[split] == len(source)
        labels = load_split(tmp_path / "out", split, schema).labels.numpy()
        np.testing.assert_array_equal(~np.isnan(labels[:, 1]), has)
        assert not np.isnan(labels[:, 0]).any()
        streamed = np.concatenate([b.labels.numpy() for b in
                                   ParquetStream(tmp_path / "out" / f"{split}.parquet", schema).batches(256)])
        np.testing.assert_array_equal(streamed, labels)
    assert 0.15 < info["scarce"].labelled["train"] / schema.rows["train"] < 0.25
    assert Schema.load(tmp_path / "out").labelled_rows("scarce", "val") == info["scarce"].labelled["val"]


def test_without_missing_values_an_empty_label_stays_an_error(tmp_path):
    raw = write_raw(tmp_path / "raw")
    spec = declare()
    spec.tasks["scarce"] = spec.tasks["scarce"].model_copy(update={"missing_values": None})
    with pytest.raises(EMMError, match=r"train\.csv, line \d+, column 'scarce': the label is missing"):
        ingest(spec, raw, tmp_path / "out", IngestConfig())
    assert not (tmp_path / "out").exists()


def test_a_split_without_a_labelled_row_is_refused_naming_task_and_split(tmp_path):
    raw = write_raw(tmp_path / "raw", val_share=0.0)
    with pytest.raises(EMMError, match=r"dataset 'partial': task 'scarce' has no labelled row in split 'val'.*"
                                       r"label_fraction"):
        ingest(declare(), raw, tmp_path / "out", IngestConfig())
    assert not (tmp_path / "out").exists()


def test_carve_stratified_by_a_task_with_missing_labels(tmp_path):
    raw = write_raw(tmp_path / "raw")
    spec = declare(files={"train": "train.csv", "test": "test.csv"},
                   carve={"source": "train", "into": ["val", "train"], "fraction": 0.2, "stratify": "scarce"})
    schema = ingest(spec, raw, tmp_path / "out", IngestConfig(block_mb=1))
    info = {t.name: t for t in schema.tasks}["scarce"]
    pos = info.positives["train"] + info.positives["val"]
    neg = info.labelled["train"] + info.labelled["val"] - pos
    missing = 3000 - pos - neg
    # each stratum (positive, negative, and the rows without the label) gets its exact share
    assert info.positives["val"] == int(np.floor(pos * 0.2 + 0.5))
    assert info.labelled["val"] - info.positives["val"] == int(np.floor(neg * 0.2 + 0.5))
    assert schema.rows["val"] - info.labelled["val"] == int(np.floor(missing * 0.2 + 0.5))


# ---- label_fraction on real Census rows ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def fractioned(tmp_path_factory, census_small_raw) -> Path:
    out = tmp_path_factory.mktemp("census-fraction") / "data"
    ingest(CENSUS, census_small_raw, out, IngestConfig(label_fraction={"income": 0.1}))
    return out


def test_unfractioned_fingerprint_is_unchanged(census_small_data):
    schema = Schema.load(census_small_data)
    assert schema.fingerprint() == CENSUS_SMALL_FINGERPRINT
    assert schema.encoding["label_fraction"] == {}
    assert all(t.labelled == schema.rows for t in schema.tasks)


def test_label_fraction_thins_train_and_val_only(fractioned, census_small_data):
    schema, plain = Schema.load(fractioned), Schema.load(census_small_data)
    assert schema.rows == plain.rows
    income = {t.name: t for t in schema.tasks}["income"]
    for split in ("train", "val"):
        share = income.labelled[split] / schema.rows[split]
        assert abs(share - 0.1) < 4 * np.sqrt(0.09 / schema.rows[split])
        new, old = (pq.read_table(d / f"{split}.parquet").to_pandas() for d in (fractioned, census_small_data))
        kept = new["income"].notna().to_numpy()
        np.testing.assert_array_equal(kept, keep_mask(0, len(new), 0.1, seed=IngestConfig().seed, task="income",
                                                      split=split))
        np.testing.assert_array_equal(new["income"].to_numpy()[kept], old["income"].to_numpy()[kept])
        pd.testing.assert_frame_equal(new.drop(columns="income"), old.drop(columns="income"))  # features untouched
        assert income.positives[split] == int(old["income"].to_numpy()[kept].sum())
    assert income.labelled["test"] == schema.rows["test"]
    assert income.positives["test"] == {t.name: t for t in plain.tasks}["income"].positives["test"]
    marital = {t.name: t for t in schema.tasks}["marital"]
    assert marital.labelled == schema.rows and marital == {t.name: t for t in plain.tasks}["marital"]
    recorded = json.loads((fractioned / "schema.json").read_text())
    assert recorded["encoding"]["label_fraction"] == {"income": 0.1}
    assert schema.fingerprint() != plain.fingerprint() == CENSUS_SMALL_FINGERPRINT
    labels = load_split(fractioned, "train", schema).labels
    assert int((~labels[:, 0].isnan()).sum()) == income.labelled["train"] and not labels[:, 1].isnan().any()


def valid(folder: Path, split: str) -> np.ndarray:
    return pq.read_table(folder / f"{split}.parquet").column("income").is_valid().to_numpy(zero_copy_only=False)


def test_label_fraction_does_not_depend_on_chunking_and_is_nested(fractioned, census_small_raw, tmp_path):
    """Train is written in several blocks with block_mb=1 and in one with the default: the same rows keep labels.

    (Val is carved from the test file with a chunk-wise random draw, so its rows may differ between
    chunkings; its labels still follow keep_mask on the row index, checked in the test above.)
    """
    blocks = tmp_path / "blocks"
    ingest(CENSUS, census_small_raw, blocks, IngestConfig(label_fraction={"income": 0.1}, block_mb=1))
    assert pq.read_table(blocks / "train.parquet").equals(pq.read_table(fractioned / "train.parquet"))
    assert pq.ParquetFile(blocks / "train.parquet").metadata.num_row_groups > 1  # really written in chunks
    larger = ingest(CENSUS, census_small_raw, tmp_path / "larger", IngestConfig(label_fraction={"income": 0.3}))
    for split in ("train", "val"):
        a, b = valid(fractioned, split), valid(tmp_path / "larger", split)
        assert not (a & ~b).any() and b.sum() > a.sum()  # rows kept at 10% are kept at 30%
    assert larger.fingerprint() != Schema.load(fractioned).fingerprint()


def test_label_fraction_for_an_unknown_task_is_refused(census_small_raw, tmp_path):
    with pytest.raises(EMMError, match=r"ingest\.label_fraction names task\(s\) \['conversion'\] that dataset "
                                       r"'census-income' does not build \(its tasks here: \['income', 'marital'\]\)"):
        ingest(CENSUS, census_small_raw, tmp_path / "out", IngestConfig(label_fraction={"conversion": 0.1}))
    assert not (tmp_path / "out").exists()


def test_a_fraction_leaving_no_labelled_row_is_refused(census_small_raw, tmp_path):
    with pytest.raises(EMMError, match=r"dataset 'census-income': task 'income' has no labelled row in split 'train' "
                                       r"\(6000 rows, labelled per split \{'train': 0, 'val': 0, 'test': 1499\}\).*"
                                       r"raise ingest\.label_fraction"):
        ingest(CENSUS, census_small_raw, tmp_path / "out", IngestConfig(label_fraction={"income": 0.0001}))
    assert not (tmp_path / "out").exists()
