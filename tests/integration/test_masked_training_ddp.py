"""The masked loss under DDP (gloo, 2 processes): labelled rows spread unevenly over the ranks.

The scarce task's labels all sit in rank 0's shard. Each rank's loss is scaled by the *global* per-task
count, so DDP's gradient average must be exactly the single-process gradient of the whole batch; and
the gathered validation metrics (NaN labels included) must be those of one process.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from emm.data.options import ScaleConfig
from emm.data.tensors import SplitTensors
from emm.train.metrics import task_metrics
from emm.train.options import TrainConfig
from emm.train.predict import predict_proba
from emm.train.trainer import Trainer, masked_bce
from tests.unit.test_masked_training import Heads, split

WORLD = 2
ROWS = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> tuple[SplitTensors, SplitTensors]:
    """Train: the scarce task labelled on 20 rows, all in the first half (rank 0's shard); val partly labelled."""
    train, val = split(ROWS, seed=21), split(ROWS, seed=22, keep_scarce=0.4)
    train.labels[20:, 1] = math.nan
    return train, val


def _shard(data: SplitTensors, rank: int) -> SplitTensors:
    size = len(data) // WORLD
    sl = slice(rank * size, (rank + 1) * size)
    return SplitTensors(data.sparse[sl], data.dense[sl], data.labels[sl], data.task_names)


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from emm.train import distributed as ddp

    with ddp.session(ScaleConfig(backend="gloo", timeout_s=120)) as ctx:
        train, val = _data()
        shard = _shard(train, rank)
        model = Heads()
        net = ddp.wrap(model, (shard.sparse[:2], shard.dense[:2]), ctx)
        loss, stats = masked_bce(net(shard.sparse, shard.dense), shard.labels, torch.isnan(shard.labels), ctx)
        loss.backward()
        torch.save({name: p.grad for name, p in model.named_parameters()}, Path(out) / f"grads-rank{rank}.pt")
        metrics = Trainer(model, TrainConfig(device="cpu"), progress=False).evaluate(_shard(val, rank))
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"stats": stats.tolist(), "metrics": metrics}))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("masked-ddp")
    mp.start_processes(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return out


def test_ddp_gradient_of_the_masked_loss_is_the_single_process_one(ddp_run):
    train, _ = _data()
    model = Heads()
    loss, stats = masked_bce(model(train.sparse, train.dense), train.labels, torch.isnan(train.labels))
    loss.backward()
    for rank in range(WORLD):
        grads = torch.load(ddp_run / f"grads-rank{rank}.pt", weights_only=True)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")
        reported = json.loads((ddp_run / f"rank{rank}.json").read_text())["stats"]
        assert reported[1] == ROWS + 20 == float(stats[1])
        assert reported[0] == pytest.approx(float(stats[0]), rel=1e-9)


def test_ddp_metrics_on_gathered_partly_labelled_rows_are_the_single_process_ones(ddp_run):
    _, val = _data()
    model = Heads()
    expected = task_metrics(val.labels.numpy(), predict_proba(model, val), val.task_names)
    for rank in range(WORLD):
        got = json.loads((ddp_run / f"rank{rank}.json").read_text())["metrics"]
        assert got["scarce"]["labelled"] == expected["scarce"]["labelled"] < ROWS
        for task in val.task_names:
            assert got[task]["auc"] == pytest.approx(expected[task]["auc"], abs=1e-7)
            assert got[task]["logloss"] == pytest.approx(expected[task]["logloss"], abs=1e-6)
