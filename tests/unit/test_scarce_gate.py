"""A task with scarce labels learns to read the other task's components through its fusion gate (issue 24).

The pool: two models per task on the tiny fake schema of ``test_akf``; task ``b``'s models are zeroed, so their
components output a constant and carry nothing about the row. ``b``'s target is a function of task ``a``'s donors,
so only ``a``'s components can explain it. ``b`` keeps its label on about a tenth of the rows (NaN elsewhere),
``a`` on every row; the fused model (the paper's ``tower`` output, ``embedding="reuse"`` so every level is the
pool's frozen components) trains on all rows with each task's cross-entropy masked to its labelled rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from emm.fusion import FusedModel, build_fused, decompose
from emm.fusion.options import AKFOptions
from emm.models.single_task import build_model
from tests.unit.test_akf import batch, make_schema, pool_specs, pretend_trained

ROWS, KEPT, STEPS = 2048, 0.1, 250
TASKS = ["a", "b"]


class DeadPool:
    """The pool above: ``a``'s models with (random, fixed) weights, ``b``'s zeroed."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.schema = make_schema(TASKS)
        self.specs = pool_specs(TASKS)
        self.models = [pretend_trained(build_model(s, self.schema), i) for i, s in enumerate(self.specs)]
        with torch.no_grad():
            for spec, model in zip(self.specs, self.models):
                if spec.task == "b":
                    for p in model.parameters():
                        p.zero_()
        self.plan = decompose(self.models, batch(16), names=[s.name for s in self.specs], head="tower")
        self.model_tasks = [s.task for s in self.specs]

    def fused(self) -> FusedModel:
        torch.manual_seed(0)
        return build_fused(self.plan, self.model_tasks, TASKS, AKFOptions(embedding="reuse", fusion_gate="scaled"),
                           self.schema)

    def rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """(sparse, dense, labels): ``a`` and ``b`` both 1 where ``a``'s mean donor logit is above its median,
        ``b`` NaN outside a random tenth of the rows."""
        sparse, dense = batch(ROWS, seed=1)
        with torch.no_grad():
            a_logit = torch.cat([m(sparse, dense) for m, t in zip(self.models, self.model_tasks) if t == "a"], 1)
        y = (a_logit.mean(1) > a_logit.mean(1).median()).float()
        labels = torch.stack([y, y], dim=1)
        kept = torch.rand(ROWS, generator=torch.Generator().manual_seed(3)) < KEPT
        labels[~kept, 1] = float("nan")
        return sparse, dense, labels


@pytest.fixture(scope="module")
def pool() -> DeadPool:
    torch.set_num_threads(1)
    return DeadPool()


def masked_bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Each task's cross-entropy over its labelled rows of the batch, summed over tasks (the Trainer's loss)."""
    labelled = ~labels.isnan()
    per_entry = F.binary_cross_entropy_with_logits(logits, torch.where(labelled, labels, 0.0), reduction="none")
    return (torch.where(labelled, per_entry, 0.0).sum(0) / labelled.sum(0).clamp(min=1)).sum()


def train(model: FusedModel, sparse: Tensor, dense: Tensor, labels: Tensor) -> None:
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, ROWS, (256,), generator=g)
        loss = masked_bce(model(sparse[idx], dense[idx]), labels[idx])
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def gates(model: FusedModel, sparse: Tensor, dense: Tensor) -> tuple[list[Tensor], list[float]]:
    """Per level: the fusion gate's [T, T] probabilities, and task b's MTM attention on the task it selected."""
    with torch.no_grad():
        model(sparse, dense)
    probs = [model.fusion_probabilities(k) for k in range(len(model.levels))]
    other = [1.0 - level["tasks"]["b"]["attention_own"] for level in model.gate_report()]
    return probs, other


def test_scarce_task_gate_reads_the_other_tasks_components(pool):
    sparse, dense, labels = pool.rows()
    assert 0.05 < (~labels[:, 1].isnan()).float().mean() < 0.15
    model = pool.fused()
    before, _ = gates(model, sparse, dense)
    train(model, sparse, dense, labels)
    after, attention_other = gates(model, sparse, dense)
    assert len(after) >= 2
    # b's gate on a: up at every level, clearly so on average, and dominant where b's tower reads
    assert all(p[1, 0] > p0[1, 0] for p, p0 in zip(after, before))
    assert sum(float(p[1, 0] - p0[1, 0]) for p, p0 in zip(after, before)) / len(after) > 0.15
    assert after[-1][1, 0] > 0.7
    assert after[-1][1, 0] > after[-1][0, 1] + 0.3  # the rich task a does not lean on b's dead components
    assert attention_other[-1] > 0.6  # MTM mixes in mostly what b selected (a's components)
    with torch.no_grad():  # and it pays: b is ranked by what only a's components compute
        scores = model(sparse, dense)[:, 1]
    y = labels[:, 0].bool()
    assert scores[y].mean() > scores[~y].mean()


def test_without_its_labels_the_scarce_task_gate_learns_nothing(pool):
    """The guard: b's gate moved because of b's few labels. With every b label NaN, b's loss is 0 and gives no
    gradient (nor a NaN one): b's fusion gates and tower stay bit identical, a's train."""
    sparse, dense, labels = pool.rows()
    labels[:, 1] = float("nan")
    model = pool.fused()
    b_parts = {f"levels.{k}.fusion_gates.1": level.fusion_gates[1] for k, level in enumerate(model.levels)}
    b_parts["towers.1"] = model.towers[1]
    start = {name: [p.detach().clone() for p in part.parameters()] for name, part in b_parts.items()}
    a_tower = [p.detach().clone() for p in model.towers[0].parameters()]
    train(model, sparse, dense, labels)
    for name, part in b_parts.items():
        assert all(torch.equal(p, p0) for p, p0 in zip(part.parameters(), start[name])), name
    assert not all(torch.equal(p, p0) for p, p0 in zip(model.towers[0].parameters(), a_tower))
    assert all(torch.isfinite(p).all() for p in model.parameters())
