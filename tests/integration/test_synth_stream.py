"""``emm synth`` and the Parquet stream: layout, planted relations, shard coverage, streamed training."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from emm.cli import app
from emm.pipeline.params import ScaleConfig, SynthConfig, TrainConfig
from emm.data.encoding import Encoder
from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.data.stream import ParquetStream, load_shard, open_split, shard_range, split_path
from emm.data.synth import SYNTH_FILE, synthesize, true_probabilities
from emm.data.tensors import load_split
from emm.models.baselines.mmoe import build_mmoe
from emm.models.single_task import ModelSpec, build_model
from emm.train.metrics import auc
from emm.train.trainer import Trainer

ROWS = 60_000
GROUP = 4_096  # many row groups, so shards start and end inside groups
# smaller vocabularies than the default: 54k training rows must be enough to learn the category effects
CFG = SynthConfig(rows=ROWS, row_group_rows=GROUP, seed=7, vocab_sizes=[10, 50, 200])
LEARNED = 0.7  # a trained model gets at least this far from chance (0.5) towards the oracle AUC


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(CFG, out)
    return out


def test_synth_writes_the_aliexpress_layout(synth_dir):
    schema = Schema.load(synth_dir)
    decl = resolve_dataset("aliexpress")
    assert [f.name for f in schema.sparse] == list(decl.sparse)
    assert [f.name for f in schema.dense] == list(decl.dense)
    assert schema.task_names == ["click", "conversion"] == list(decl.default_tasks)
    assert sum(schema.rows.values()) == ROWS and schema.rows["val"] == schema.rows["test"] == ROWS // 20
    for split, n in schema.rows.items():
        pf = pq.ParquetFile(synth_dir / f"{split}.parquet")
        assert pf.metadata.num_rows == n
        assert max(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)) <= GROUP
        assert pf.schema_arrow.field("categorical_1").type == pa.int32()
        assert pf.schema_arrow.field("numerical_63").type == pa.float32()
    Encoder.load(synth_dir, schema)  # the vocabulary file agrees with schema.json
    train = load_split(synth_dir, "train", schema)
    local = train.sparse - torch.tensor([f.offset for f in schema.sparse])
    assert int(local.min()) >= 1  # index 0 stays reserved for unseen values
    assert (local < torch.tensor([f.vocab_size for f in schema.sparse])).all()
    assert float(train.dense.min()) >= 0.0 and float(train.dense.max()) <= 1.0


def test_planted_relations_hold(synth_dir):
    schema = Schema.load(synth_dir)
    labels = load_split(synth_dir, "train", schema).labels.numpy()
    click, conversion = labels[:, 0], labels[:, 1]
    assert not ((conversion == 1) & (click == 0)).any()  # no conversion without a click
    assert click.mean() == pytest.approx(CFG.click_rate, abs=0.01)
    assert conversion[click == 1].mean() == pytest.approx(CFG.conversion_given_click, abs=0.02)
    record = json.loads((synth_dir / SYNTH_FILE).read_text())
    assert 0.6 < record["oracle_auc"]["click"] < 0.95 and 0.6 < record["oracle_auc"]["conversion"] < 0.99
    # the shared latent: click's true probability alone ranks conversions well
    assert record["click_probability_auc_on_conversion"] > 0.7


def test_true_probabilities_are_those_of_the_written_rows(synth_dir):
    """The relatedness sweep scores the oracle on the very test rows models are scored on: the regenerated
    labels must be the written ones (every chunk of many row groups), and the truth must rank them as well
    as synth.json's calibration sample says."""
    schema = Schema.load(synth_dir)
    record = json.loads((synth_dir / SYNTH_FILE).read_text())
    for split in ("val", "test"):
        written = load_split(synth_dir, split, schema).labels.numpy()
        labels, truth = true_probabilities(CFG, split)
        for j, task in enumerate(schema.task_names):
            assert (labels[task] == written[:, j]).all(), (split, task)
            assert truth[task].shape == (schema.rows[split],)
            assert auc(written[:, j], truth[task]) == pytest.approx(record["oracle_auc"][task], abs=0.03)
    other, _ = true_probabilities(CFG.model_copy(update={"shared_weight": 0.1}), "test")  # another world
    assert not (other["conversion"] == labels["conversion"]).all()


def test_synth_is_reproducible_and_seeded(tmp_path):
    small = CFG.model_copy(update={"rows": 5_000})
    for seed, name in ((7, "a"), (7, "b"), (8, "c")):
        synthesize(small.model_copy(update={"seed": seed}), tmp_path / name)
    ta, tb, tc = (pq.read_table(tmp_path / n / "train.parquet") for n in "abc")
    assert ta.equals(tb) and not ta.equals(tc)


@pytest.mark.parametrize("world", [1, 3])
def test_shards_are_disjoint_and_cover_the_split(synth_dir, world):
    schema = Schema.load(synth_dir)
    full = load_split(synth_dir, "train", schema)
    n = len(full)
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    streamed, shuffled = [], []
    for rank in range(world):
        shard = load_shard(synth_dir, "train", schema, rank, world)
        lo, hi = ranges[rank]
        assert torch.equal(shard.sparse, full.sparse[lo:hi]) and torch.equal(shard.dense, full.dense[lo:hi])
        stream = ParquetStream(split_path(synth_dir, "train", schema), schema, rank=rank, world=world,
                               buffer_rows=10_000)
        assert len(stream) == hi - lo
        streamed.append(torch.cat([b.dense for b in stream.batches(1000)]))
        shuffled.append(torch.cat([b.dense for b in stream.batches(1000, shuffle=True, seed=1, epoch=1,
                                                                      pad_to=n // world + 1)]))
    assert torch.equal(torch.cat(streamed), full.dense)  # in order: exactly the split, once
    for rank, rows in enumerate(shuffled):  # shuffled: the same rows (plus at most one repeat), another order
        lo, hi = ranges[rank]
        assert len(rows) == n // world + 1
        assert not torch.equal(rows[: hi - lo], full.dense[lo:hi])
        own = {tuple(r) for r in full.dense[lo:hi, :4].tolist()}
        assert {tuple(r) for r in rows[:, :4].tolist()} == own


def test_streaming_trainer_learns_the_planted_tasks(synth_dir):
    torch.set_num_threads(1)
    schema = Schema.load(synth_dir)
    record = json.loads((synth_dir / SYNTH_FILE).read_text())
    scale = ScaleConfig(stream="always", buffer_rows=8_192)
    train, val, test = (open_split(synth_dir, s, schema, scale) for s in ("train", "val", "test"))
    assert isinstance(train, ParquetStream)
    cfg = TrainConfig(batch_size=512, max_epochs=4, patience=4, lr=1e-2, device="cpu")

    torch.manual_seed(0)
    trainer = Trainer(build_mmoe(schema, n_experts=2), cfg, progress=False)
    fit = trainer.fit(train, val)
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]
    metrics = trainer.evaluate(test)
    for task in ("click", "conversion"):
        assert metrics[task]["auc"] > 0.5 + LEARNED * (record["oracle_auc"][task] - 0.5), (task, metrics, record)
        assert metrics[task]["auc"] < record["oracle_auc"][task] + 0.03, task  # cannot beat the truth
    # the relation a fusion can use: a click-only model already ranks conversions above chance
    torch.manual_seed(0)
    click_model = build_model(ModelSpec(name="c", task="click", arch="mlp", hidden=[32, 16]), schema)
    click_trainer = Trainer(click_model, cfg.model_copy(update={"max_epochs": 1}), progress=False)
    click_trainer.fit(train.select_tasks(["click"]), val.select_tasks(["click"]))

    scores = click_trainer.predict(test.select_tasks(["click"]))[:, 0]
    on_conversion = auc(load_split(synth_dir, "test", schema).labels.numpy()[:, 1], scores)
    assert on_conversion > 0.5 + LEARNED * (record["click_probability_auc_on_conversion"] - 0.5), on_conversion


def test_synth_cli(tmp_path):
    runner = CliRunner()
    done = runner.invoke(app, ["synth", "--rows", "3000", "--out", str(tmp_path / "d"), "--seed", "3"])
    assert done.exit_code == 0, done.output
    assert Schema.load(tmp_path / "d").rows == {"train": 2700, "val": 150, "test": 150}
    bad = runner.invoke(app, ["synth", "--rows", "0", "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and "rows" in bad.output and not (tmp_path / "e").exists()
