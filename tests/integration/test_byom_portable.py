"""The two helpers behind outside members, on a real Census slice: UserBatches hands out exactly EMM's
numbers in both conventions, and the portable graph round-trips a model bit for bit while refusing a
record that would make the loader import anything but torch."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from emm.data.batches import UserBatches, to_dict
from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.models.portable import build_portable, make_portable


class PerFeature(nn.Module):
    """A dict-convention model with a shape branch (as torch-rechub has) and functional code."""

    def __init__(self, sparse: list[tuple[str, int]], dense: list[str]) -> None:
        super().__init__()
        self.tables = nn.ModuleDict({n: nn.Embedding(v, 3) for n, v in sparse})
        self.dense = dense
        self.norm = nn.BatchNorm1d(3 * len(sparse) + len(dense))
        self.out = nn.Linear(3 * len(sparse) + len(dense), 1)
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.tables[n](x[n]) for n in self.tables]
        parts += [x[n] if x[n].dim() > 1 else x[n].unsqueeze(1) for n in self.dense]
        return torch.sigmoid(self.out(self.norm(torch.cat(parts, 1))).squeeze(1) * self.scale)


def test_user_batches_are_emm_batches_in_both_conventions(census_small_data):
    schema = Schema.load(census_small_data)
    split = load_split(census_small_data, "train", schema)
    tensors = UserBatches(census_small_data, "train", tasks=["marital", "income"], batch_size=1000)
    dicts = UserBatches(census_small_data, "train", tasks="income", inputs="dict", batch_size=1000)
    assert len(tensors) == len(dicts) == 6
    ((sparse, dense), y2), (x, y1) = next(iter(tensors)), next(iter(dicts))
    assert torch.equal(sparse, split.sparse[:1000]) and torch.equal(dense, split.dense[:1000])
    assert torch.equal(y2[:, 1], y1) and torch.equal(y1, split.labels[:1000, schema.task_names.index("income")])
    for j, f in enumerate(schema.sparse):  # local index = global - offset, inside the feature's vocabulary
        assert torch.equal(x[f.name], sparse[:, j] - f.offset)
        assert 0 <= int(x[f.name].min()) and int(x[f.name].max()) < f.vocab_size
    assert torch.equal(x[schema.dense[0].name], dense[:, 0])
    shuffled = [b[1] for b in UserBatches(census_small_data, "train", tasks="income", shuffle=True, seed=7)]
    again = [b[1] for b in UserBatches(census_small_data, "train", tasks="income", shuffle=True, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again)) and sum(len(b) for b in shuffled) == len(split)


def test_portable_graph_round_trips_and_refuses_foreign_code(census_small_data):
    from emm.models.external import ExternalAdapter

    schema = Schema.load(census_small_data)
    val = load_split(census_small_data, "val", schema)
    model = PerFeature([(f.name, f.vocab_size) for f in schema.sparse], [f.name for f in schema.dense]).eval()
    adapter = ExternalAdapter(model, schema, inputs="dict", output="probability").eval()
    portable, record = make_portable(adapter, [(val.sparse[:64], val.dense[:64]), (val.sparse[:3], val.dense[:3])],
                                     name="mine", class_name="PerFeature")
    rebuilt = build_portable(json.loads(json.dumps(record)))  # from JSON alone, tensors zero until loaded
    rebuilt.load_state_dict(portable.state_dict())
    with torch.no_grad():
        want = torch.logit(model(to_dict(val.sparse, val.dense, schema)).clamp(1e-7, 1 - 1e-7)).unsqueeze(1)
        assert torch.equal(rebuilt(val.sparse, val.dense), want)
    assert type(rebuilt).__name__ == "PerFeature" and "PerFeature" not in json.dumps(record["modules"])

    evil = copy.deepcopy(record)
    call = next(n for n in evil["nodes"] if n["op"] == "call_function")
    call["target"] = {"function": "os:system"}
    with pytest.raises(EMMError, match=r"calls 'os:system', which is not a torch or operator function; refusing"):
        build_portable(evil)
    evil = copy.deepcopy(record)
    evil["modules"][next(iter(evil["modules"]))]["class"] = "subprocess.Popen"
    with pytest.raises(EMMError, match=r"is a subprocess.Popen, not a torch.nn layer; refusing it"):
        build_portable(evil)
