"""Missing labels in the data layer: the keep mask, label encoding, schema counts, tensors and streams."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from emm.data.encoding import encode_labels
from emm.data.labels import keep_mask, labelled_mask, require_labelled
from emm.data.options import IngestConfig, SynthConfig
from emm.data.schema import DenseFeature, Schema, SparseFeature, TaskInfo
from emm.data.spec import TaskSpec
from emm.data.stream import ParquetStream
from emm.data.synth import SYNTH_FILE, synthesize, true_probabilities
from emm.data.tensors import SplitTensors, frame_to_tensors, load_split
from emm.errors import EMMError

# ---- keep_mask ---------------------------------------------------------------------------------------------


def test_keep_mask_keeps_about_the_fraction():
    for fraction in (0.02, 0.3, 0.9):
        kept = keep_mask(0, 200_000, fraction, seed=1, task="conversion", split="train").mean()
        assert abs(kept - fraction) < 4 * np.sqrt(fraction * (1 - fraction) / 200_000)


def test_keep_mask_does_not_depend_on_chunking():
    whole = keep_mask(0, 10_000, 0.1, seed=3, task="t", split="val")
    cuts = [0, 1, 17, 4096, 4097, 9999, 10_000]
    pieces = np.concatenate([keep_mask(a, b - a, 0.1, seed=3, task="t", split="val") for a, b in zip(cuts, cuts[1:])])
    np.testing.assert_array_equal(whole, pieces)


def test_keep_mask_fractions_are_nested():
    small = keep_mask(0, 50_000, 0.02, seed=5, task="t", split="train")
    large = keep_mask(0, 50_000, 0.05, seed=5, task="t", split="train")
    assert small.sum() > 0 and large.sum() > small.sum()
    assert not (small & ~large).any()  # every row kept at 2% is kept at 5%


def test_keep_mask_differs_by_seed_task_and_split():
    base = keep_mask(0, 5_000, 0.5, seed=1, task="a", split="train")
    for other in (dict(seed=2, task="a", split="train"), dict(seed=1, task="b", split="train"),
                  dict(seed=1, task="a", split="val")):
        assert (keep_mask(0, 5_000, 0.5, **other) != base).mean() > 0.4


def test_keep_mask_full_fraction_and_bad_fraction():
    assert keep_mask(7, 100, 1.0, seed=0, task="t", split="train").all()
    with pytest.raises(ValueError, match="outside"):
        keep_mask(0, 10, 0.0, seed=0, task="t", split="train")


# ---- labelled_mask / require_labelled ------------------------------------------------------------------------


def test_labelled_mask_on_numpy_and_torch():
    y = np.array([1.0, np.nan, 0.0], np.float32)
    np.testing.assert_array_equal(labelled_mask(y), [True, False, True])
    assert labelled_mask(torch.from_numpy(y)).tolist() == [True, False, True]


def test_require_labelled_returns_the_mask_and_refuses_unscorable_columns():
    y = np.array([1.0, np.nan, 0.0, np.nan])
    np.testing.assert_array_equal(require_labelled(y, "conversion", "val", "early stopping"),
                                  [True, False, True, False])
    assert require_labelled(torch.tensor(y), "c", "val", "x").tolist() == [True, False, True, False]
    with pytest.raises(EMMError, match=r"task 'conversion' has no labelled row in split 'val' \(early stopping\)"
                                       r".*label_fraction"):
        require_labelled(np.full(4, np.nan), "conversion", "val", "early stopping")
    with pytest.raises(EMMError, match=r"task 'conversion' has labelled rows of one class only in split 'test'"
                                       r".*all 2 are positive"):
        require_labelled(np.array([1.0, np.nan, 1.0]), "conversion", "test", "AUC")


# ---- declarations and label encoding -----------------------------------------------------------------------


def test_missing_values_mean_no_label():
    task = TaskSpec(column="y", positive_values=["yes"], negative_values=["no"], missing_values=["", " ?"])
    assert task.missing_values == ["", "?"]  # stripped like the reader strips values
    y = encode_labels(pd.Series(["yes", "", "no", "?"]), task, source="f.csv", first_line=2, name="y")
    np.testing.assert_array_equal(y, np.array([1, np.nan, 0, np.nan], np.float32))
    assert y.dtype == np.float32
    thresh = TaskSpec(column="y", threshold=0.5, missing_values=["NA"])
    np.testing.assert_array_equal(encode_labels(pd.Series(["1", "NA", "0.2"]), thresh, source="f", first_line=2),
                                  np.array([1, np.nan, 0], np.float32))


def test_other_values_are_still_refused():
    task = TaskSpec(column="y", positive_values=["yes"], negative_values=["no"], missing_values=[""])
    with pytest.raises(EMMError, match=r"f\.csv, line 4, column 'y': label 'maybe' of task 't' is neither"):
        encode_labels(pd.Series(["yes", "", "maybe"]), task, source="f.csv", first_line=2, name="t")
    plain = TaskSpec(column="y", positive_values=["yes"])
    with pytest.raises(EMMError, match=r"line 3, column 'y': the label is missing .*missing_values"):
        encode_labels(pd.Series(["yes", ""]), plain, source="f.csv", first_line=2)
    thresh = TaskSpec(column="y", threshold=0.5, missing_values=[""])
    with pytest.raises(EMMError, match=r"label 'NA' is not a number"):
        encode_labels(pd.Series(["1", "", "NA"]), thresh, source="f", first_line=2)


def test_a_value_both_missing_and_positive_is_refused():
    with pytest.raises(ValidationError, match="both missing and positive/negative"):
        TaskSpec(column="y", positive_values=["?"], missing_values=["?"])


def test_label_fraction_values_are_checked():
    assert IngestConfig(label_fraction={"income": 1.0}).label_fraction == {"income": 1.0}
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValidationError):
            IngestConfig(label_fraction={"income": bad})
        with pytest.raises(ValidationError):
            SynthConfig(label_fraction={"click": bad})


# ---- schema -------------------------------------------------------------------------------------------------


def make_schema(labelled: dict[str, int] | None = None, fractions: dict | None = None) -> Schema:
    encoding = {"seed": 1} if fractions is None else {"seed": 1, "label_fraction": fractions}
    return Schema(
        dataset="toy", sparse=[SparseFeature(name="c", vocab_size=4, offset=0)],
        dense=[DenseFeature(name="d", min=0.0, max=1.0)],
        tasks=[TaskInfo(name="a", column="a", rule={}, positives={"train": 2}, positive_rate={"train": 0.5},
                        labelled=labelled),
               TaskInfo(name="b", column="b", rule={}, positives={"train": 1}, positive_rate={"train": 0.1})],
        rows={"train": 10, "val": 5, "test": 5}, raw_files=[], encoding=encoding)


def test_labelled_rows_and_old_schemas(tmp_path):
    schema = make_schema(labelled={"train": 4, "val": 2, "test": 5})
    assert schema.labelled_rows("a", "train") == 4
    assert schema.labelled_rows("b", "val") == 5  # no count recorded: every row is labelled
    with pytest.raises(EMMError, match="no task 'zz'"):
        schema.labelled_rows("zz", "train")
    schema.save(tmp_path)
    assert Schema.load(tmp_path).labelled_rows("a", "val") == 2
    old = json.loads((tmp_path / "schema.json").read_text())
    for t in old["tasks"]:
        t.pop("labelled")  # a schema.json written before labels could be missing
    (tmp_path / "schema.json").write_text(json.dumps(old))
    assert Schema.load(tmp_path).labelled_rows("a", "train") == 10


def test_fingerprint_counts_label_fraction_only_when_set():
    plain = make_schema()
    assert make_schema(fractions={}).fingerprint() == plain.fingerprint()
    assert make_schema(labelled={"train": 4}).fingerprint() == plain.fingerprint()  # counts are no encoding
    assert make_schema(fractions={"a": 0.1}).fingerprint() != plain.fingerprint()
    assert make_schema(fractions={"a": 0.1}).fingerprint() != make_schema(fractions={"a": 0.2}).fingerprint()


# ---- tensors and streams ------------------------------------------------------------------------------------


def write_toy_split(folder, n: int = 1000, group: int = 128) -> Schema:
    """A split with nulls in task 'a' (every third row) and full labels in task 'b'."""
    rng = np.random.default_rng(0)
    has_a = np.arange(n) % 3 != 0
    table = pa.table({"c": pa.array(rng.integers(1, 4, n).astype(np.int32)),
                      "d": pa.array(rng.random(n).astype(np.float32)),
                      "a": pa.array((np.arange(n) % 2).astype(np.int8), mask=~has_a, type=pa.int8()),
                      "b": pa.array((np.arange(n) % 5 == 0).astype(np.int8), type=pa.int8())})
    pq.write_table(table, folder / "train.parquet", row_group_size=group)
    schema = make_schema(labelled={"train": int(has_a.sum()), "val": 0, "test": 0})
    schema.save(folder)
    return schema


def test_load_split_gives_nan_for_missing_labels(tmp_path):
    schema = write_toy_split(tmp_path)
    split = load_split(tmp_path, "train", schema)
    a = split.labels[:, 0].numpy()
    assert np.isnan(a[::3]).all() and not np.isnan(np.delete(a, np.s_[::3])).any()
    assert not split.labels[:, 1].isnan().any()
    only = split.labelled("a")
    assert len(only) == schema.labelled_rows("a", "train") and not only.labels[:, 0].isnan().any()
    assert only.task_names == ["a", "b"] and only.sparse.shape[0] == only.dense.shape[0] == len(only)
    assert split.labelled("b") is split  # every row labelled: nothing to cut
    with pytest.raises(EMMError, match="task 'x' is not in these tensors"):
        split.labelled("x")


def test_frame_to_tensors_reads_nullable_int8():
    schema = make_schema()
    frame = pd.DataFrame({"c": [1, 2], "d": [0.5, 0.1], "a": pd.array([1, None], dtype="Int8"),
                          "b": pd.array([0, 1], dtype="Int8")})
    labels = frame_to_tensors(frame, schema).labels.numpy()
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, np.array([[1, 0], [np.nan, 1]], np.float32))


def test_parquet_stream_gives_nan_and_streams_labelled_rows(tmp_path):
    schema = write_toy_split(tmp_path)
    path = tmp_path / "train.parquet"
    stream = ParquetStream(path, schema)
    rows = torch.cat([b.labels for b in stream.batches(100)])
    np.testing.assert_array_equal(rows.numpy(), load_split(tmp_path, "train", schema).labels.numpy())
    labelled = stream.labelled("a")
    assert len(labelled) == schema.labelled_rows("a", "train")
    got = torch.cat([b.labels for b in labelled.batches(64, shuffle=True, seed=1)])
    assert len(got) == len(labelled) and not got[:, 0].isnan().any()
    assert sorted(got[:, 1].tolist()) == sorted(load_split(tmp_path, "train", schema).labelled("a").labels[:, 1].tolist())
    assert not labelled.head(50).labels[:, 0].isnan().any() and len(labelled.head(50)) == 50
    only_b = labelled.select_tasks(["b"])  # the filter column need not be among the streamed tasks
    assert len(torch.cat([b.labels for b in only_b.batches(64)])) == len(labelled)
    # shards cut inside row groups: counts add up, and pad_to evens out the ranks
    shards = [ParquetStream(path, schema, rank=r, world=3, labelled_only="a") for r in range(3)]
    assert sum(len(s) for s in shards) == len(labelled)
    most = max(len(s) for s in shards)
    for s in shards:
        for shuffle in (False, True):
            assert sum(len(b) for b in s.batches(50, shuffle=shuffle, pad_to=most)) == most


# ---- synth --------------------------------------------------------------------------------------------------


def test_synth_label_fraction(tmp_path):
    cfg = SynthConfig(rows=12_000, row_group_rows=1_000, seed=3, vocab_sizes=[10, 20], val_fraction=0.2,
                      test_fraction=0.2, label_fraction={"conversion": 0.3})
    schema = synthesize(cfg, tmp_path)
    info = {t.name: t for t in schema.tasks}
    for split in ("train", "val"):
        frac = info["conversion"].labelled[split] / schema.rows[split]
        assert abs(frac - 0.3) < 0.03
        assert info["click"].labelled[split] == schema.rows[split]
    assert info["conversion"].labelled["test"] == schema.rows["test"]
    table = pq.read_table(tmp_path / "train.parquet")
    conv = table.column("conversion")
    assert conv.type == pa.int8() and conv.null_count == schema.rows["train"] - info["conversion"].labelled["train"]
    full, _ = true_probabilities(cfg, "train")  # the generator still gives every label
    kept = keep_mask(0, schema.rows["train"], 0.3, seed=3, task="conversion", split="train")
    np.testing.assert_array_equal(conv.is_valid().to_numpy(zero_copy_only=False), kept)
    np.testing.assert_array_equal(conv.to_numpy(zero_copy_only=False)[kept], full["conversion"][kept])
    assert info["conversion"].positives["train"] == int(full["conversion"][kept].sum())
    assert info["conversion"].positive_rate["train"] == pytest.approx(
        info["conversion"].positives["train"] / info["conversion"].labelled["train"])
    assert schema.encoding["label_fraction"] == {"conversion": 0.3}
    assert json.loads((tmp_path / SYNTH_FILE).read_text())["label_fraction"] == {"conversion": 0.3}
    plain = synthesize(cfg.model_copy(update={"label_fraction": {}}), tmp_path / "plain")
    assert plain.fingerprint() != schema.fingerprint()
    assert {t.name: t.labelled for t in plain.tasks}["conversion"] == plain.rows


def test_synth_refuses_an_unknown_task(tmp_path):
    with pytest.raises(EMMError, match=r"synth.label_fraction names task\(s\) \['purchase'\]"):
        synthesize(SynthConfig(rows=2_000, label_fraction={"purchase": 0.5}), tmp_path)
