"""The fused multi-task model (paper III-C, Algorithm 2): AKF levels stacked on a decomposition plan.

``FusedModel(plan, model_tasks, task_names, cfg)`` maps ``(sparse, dense)`` to logits ``[B, T]`` in
``task_names`` order (no sigmoid: the loss and the metrics apply it). Level by level, every task's
input goes through the components of that level (each pool model's component receives the input of
the model's own task), is fused within the task and across tasks by an ``AKFLevel``
(``emm.fusion.akf``), and the per-task outputs feed the next level; after the last level one fresh,
trainable ``Tower`` per task gives its logit. The pool models' own heads are not used.

Recipes (``emm.fusion.recipes``): the model is wired from parts, each looked up by its config string.
    ``embedding``  the level-0 entry: ``retrain`` (the paper: a fresh, trainable, shared ``FeatureEmbedding``,
                   which replaces plan level 0 when that level is the pool's embeddings) or ``reuse`` (the
                   pool's own level-0 components, fused by AKF level 0 like any other level).
    ``fusion_gate``, ``attention``  how each ``AKFLevel`` mixes in the selected task (``emm.fusion.akf``).
    ``output``     the output head: ``tower`` (the paper), ``donor_residual`` (the donors' blend plus the
                   towers as a residual that starts at zero, ``emm.fusion.blend``) or ``cross_residual`` (the
                   same with every donor allowed in every task's blend: the cross-task stack).

Ablations (``cfg.ablation``, paper Table II)
    ``full``        trained components, frozen; MTM on (EMM).
    ``+pretrained`` trained components, frozen; no MTM (``z^t = h^t``).
    ``+mtm``        same architecture, components randomly re-initialised and trainable; MTM on.
    ``baseline``    random trainable components; no MTM.
    Re-initialisation calls ``reset_parameters()`` on every module that has one (Linear, Embedding,
    BatchNorm, ...: BatchNorm's running statistics are reset too); a parameter owned by a module without
    one is re-drawn (Xavier-uniform for matrices, zeros otherwise). It applies to every component kept
    in the model, including the embedding level under ``embedding="reuse"``.

Frozen means frozen: components are deep copies of the plan's, all their parameters have
``requires_grad=False``, and ``AKFLevel.train`` keeps them in eval mode when the model is put in
train mode, so their BatchNorm statistics and Dropout never change or act. They remain sub-modules,
so ``state_dict`` holds the whole fused model. ``trainable_parameters()`` lists what an optimiser needs.

Rebuilding: ``config_dict()`` is a JSON-able description; together with the plan (``load_plan`` on
the folder ``save_plan`` wrote) ``FusedModel.from_config(plan, config)`` rebuilds the same
architecture, into which the saved ``state_dict`` loads.

Tree members (``emm.models.trees``): a pool's LightGBM / XGBoost models are never decomposed; they come as
``OutputMember``s and join the donor heads' blends after the plan's networks (``emm.fusion.blend``), named in
``donor_names``. ``config_dict`` records each one's native file and digest and its ``TreeModel.layout()``, so
``from_config`` rebuilds it with torch alone and its tensors load with the rest of the state dict.

Pruned (``emm.fusion.prune``): the model ``fuse`` saves leaves out what adds exactly nothing (a task's residual
tower whose last layer is exactly 0, and then possibly the whole AKF stack; donors no blend weighs) and computes
AKF level 0 once for itself and the donors when those are the same modules. ``pruning`` says what; the config
records it, and ``from_config`` rebuilds exactly that architecture. A pruned model scores; it is not trained.
A whole model, in training, also computes AKF level 0 once for itself and the donors, for as long as the two are
provably the same frozen modules (``emm.fusion.shared``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from emm.data.schema import Schema
from emm.errors import EMMError
from emm.fusion.akf import AKFLevel
from emm.fusion.blend import DonorBlend, DonorPaths, OutputMember
from emm.fusion.decompose import Plan
from emm.fusion.options import ABLATIONS, AKFOptions
from emm.fusion.plan_parts import (check_levels, check_tasks, embedding_only_level, flat_width, level_adapters,
                                   level_components)
from emm.fusion.prune import Dropped, Pruning, apply_pruning
from emm.fusion.recipes import ATTENTIONS, ENTRIES, FUSION_GATES, OUTPUTS, Attention, FusionGate
from emm.fusion.shared import Level0Sharing
from emm.models.embedding import FeatureEmbedding
from emm.models.single_task import Tower
from emm.models.tree_native import traced
from emm.models.trees import TreeModel

FUSED_FORMAT = "emm.fused/2"


class FusedModel(nn.Module):
    """EMM's multi-task model built from a decomposition plan (see the module docstring).

    Args:
        plan: from ``emm.fusion.decompose`` / ``load_plan``; its components are copied, not shared.
        model_tasks: the task of each plan model, in plan order.
        task_names: the output columns, in order; every task needs at least one pool model.
        cfg: ``AKFOptions`` (output, embedding, fusion_gate, attention, ablation, qkv_dim, tower); a stage config
            that extends it (``FuseConfig``) is cut down to these fields, the only ones ``fused.json`` keeps.
        embedding: with ``embedding="retrain"``, the fresh ``FeatureEmbedding`` to train (``build_fused``
            builds one from the data schema); None derives its sizes from the plan's level-0 embedding.
            Must be None with ``embedding="reuse"``.
        outputs: the pool members that join at the output (tree models), in pool order: donors after the plan's
            networks, for an output head that keeps donors (``donor_residual``, ``cross_residual``).
    """

    def __init__(self, plan: Plan, model_tasks: Sequence[str], task_names: Sequence[str], cfg: AKFOptions,
                 embedding: FeatureEmbedding | None = None, outputs: Sequence[OutputMember] = ()) -> None:
        super().__init__()
        self.model_tasks = [str(t) for t in model_tasks]
        self.task_names = [str(t) for t in task_names]
        self.model_names = list(plan.names)
        # every donor a blend column stands for: the plan's networks, then the output members
        self.donor_names = [*self.model_names, *(m.name for m in outputs)]
        self.output_members = [{"name": m.name, "task": m.task, "format": m.module.format, "file": m.file,
                                "sha256": m.sha256, "layout": m.module.layout()} for m in outputs]
        unknown = sorted({m.task for m in outputs} - set(self.task_names))
        if unknown:
            raise EMMError(f"tree model(s) {[m.name for m in outputs if m.task in unknown]} are for task(s) {unknown}, "
                           f"which are not in task_names {self.task_names}; leave them out of the pool")
        cfg = AKFOptions.model_validate(cfg.model_dump(include=set(AKFOptions.model_fields)))
        self.cfg = cfg
        check_tasks(plan, self.model_tasks, self.task_names)
        check_levels(plan)
        self.frozen = ABLATIONS[cfg.ablation].pretrained
        self.mtm = ABLATIONS[cfg.ablation].mtm
        self.level0_embedding_only = embedding_only_level(plan, 0)
        self.entry = ENTRIES.resolve(cfg.embedding)
        self.output_head = OUTPUTS.resolve(cfg.output)
        gate, attention = FUSION_GATES.resolve(cfg.fusion_gate), ATTENTIONS.resolve(cfg.attention)

        self.embedding: FeatureEmbedding | None = self.entry.embedding(plan, embedding)
        self.replaces_level0 = self.entry.replaces_level0(plan, self.embedding)
        # what ``from_config`` rebuilds it from, kept apart because a pruned model may drop the embedding itself
        self.embedding_config = self.entry.config(self.embedding)
        self.first_level = int(self.replaces_level0)
        self.levels = nn.ModuleList(self._level(plan, k, gate, attention)
                                    for k in range(self.first_level, plan.num_levels))
        self.width = flat_width(plan.levels[-1].out_shape)
        self.towers = nn.ModuleList(Tower(self.width, list(cfg.tower)) for _ in self.task_names)
        self.donors: DonorPaths | None = None  # set by an output head that keeps the donors (donor_residual)
        self.blend: DonorBlend | None = None
        # ``outputs`` only when there are any: a head written before tree members joined still builds without them
        joins = {"outputs": outputs} if outputs else {}
        for name, module in self.output_head.build(plan, self.model_tasks, self.task_names, self.towers,
                                                   **joins).items():
            setattr(self, name, module)
        self.pruning = Pruning()  # nothing left out: ``emm.fusion.prune`` sets what a saved model leaves out
        self.level0_sharing = Level0Sharing()  # level 0 computed once for itself and the donors while it may be

    def _level(self, plan: Plan, k: int, gate: FusionGate, attention: Attention) -> AKFLevel:
        """Plan level k fused: its components as the ablation wants them, gated on the previous level's output
        (level 0: on what the level-0 entry gives)."""
        components = level_components(plan, k, pretrained=self.frozen)
        pre, post = level_adapters(plan, k)
        gate_dim = self.entry.gate_dim(plan, self.embedding) if k == 0 else flat_width(plan.levels[k - 1].out_shape)
        component_tasks = [self.task_names.index(t) for t in self.model_tasks]
        return AKFLevel(components, component_tasks, len(self.task_names), plan.levels[k].out_shape, gate_dim,
                        mtm=self.mtm, fusion_gate=gate, attention=attention, qkv_dim=self.cfg.qkv_dim,
                        frozen=self.frozen, pre=pre, post=post, index=k)

    # -- forward --------------------------------------------------------------------------------

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """Logits [B, T] in ``task_names`` order."""
        if not self.levels:  # pruned: no task keeps a residual, so no AKF work changes a score
            return self.output_head.logits(self, dense.new_zeros(dense.shape[0], len(self.task_names)), sparse, dense)
        inputs, gates = self.entry.start(self.embedding, self.replaces_level0, len(self.task_names), sparse, dense)
        level0 = self.levels[0].raw_outputs(inputs) if self._shares_level0(sparse, dense) else None
        zs: list[Tensor] = []
        for k, level in enumerate(self.levels):
            zs = level(inputs, gates, raw=level0 if k == 0 else None)
            inputs = [(z,) for z in zs]
            gates = [z.reshape(z.shape[0], -1) for z in zs]
        out = torch.cat([z.new_zeros(z.shape[0], 1) if isinstance(tower, Dropped) else tower(z.reshape(z.shape[0], -1))
                         for tower, z in zip(self.towers, zs)], dim=1)
        if level0 is None:
            return self.output_head.logits(self, out, sparse, dense)
        return self.output_head.logits(self, out, sparse, dense, level0)  # a donor head (``prune.level0_shareable``)

    def _shares_level0(self, sparse: Tensor, dense: Tensor) -> bool:
        """Whether the donors take AKF level 0's outputs this forward: for good in a pruned model that says so, and
        in a whole one while the two are provably one frozen computation (``emm.fusion.shared``). Not while a whole
        model is traced or exported: the proof reads tensor values, which a tracer cannot, and the unshared forward
        is the same computation."""
        if not self.pruning.empty:
            return self.pruning.shared_level0
        if traced(sparse, dense):
            return False
        return self.level0_sharing.holds(self)

    def donor_logits(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """``[B, n_models]``: every donor's own logit (``output="donor_residual"`` or ``"cross_residual"`` only;
        pruned: the donors still run, ``donors.kept``)."""
        if not self.pruning.shared_level0:
            return self.output_head.donor_logits(self, sparse, dense)
        inputs, _ = self.entry.start(self.embedding, self.replaces_level0, len(self.task_names), sparse, dense)
        return self.output_head.donor_logits(self, sparse, dense, self.levels[0].raw_outputs(inputs))

    def prepare(self, sparse: Tensor, dense: Tensor, labels: Tensor, *,
                batch_size: int = 65536) -> dict[str, dict[str, float]] | None:
        """Fit what the output head fits on held-out (validation) rows before training (``donor_residual``,
        ``cross_residual``: the blend, as the donor stack); ``labels`` ``[N, T]`` in ``task_names`` order, NaN where
        a row has no label for a task (each task is fitted on its labelled rows). Returns the record for
        ``fused.json``, or None when the head has nothing to fit (``tower``)."""
        self._whole("fit its output head")
        return self.output_head.prepare(self, sparse, dense, labels, batch_size=batch_size)

    def start_state(self) -> dict[str, Tensor]:
        """A copy of what makes the step-0 model (``donor_residual``/``cross_residual``: the blend)."""
        self._whole("keep its step-0 state")
        return self.output_head.start_state(self)

    def restore_start(self, task: str, state: dict[str, Tensor]) -> None:
        """Put one task back to its step-0 output (``state`` from ``start_state``), the others untouched."""
        self._whole("go back to step 0")
        self.output_head.restore_start(self, self.task_names.index(task), state)

    def _whole(self, what: str) -> None:
        """Refuse training steps on a pruned model: its towers, donors or levels are no longer all there."""
        if not self.pruning.empty:
            raise EMMError(f"this fused model is pruned for scoring ({self.pruning.config(self.task_names)['why']}), "
                           f"so it cannot {what}; train the model the fuse stage builds (FuseRunner), not a saved one")

    # -- helpers --------------------------------------------------------------------------------

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters an optimiser should get (frozen components excluded)."""
        return (p for p in self.parameters() if p.requires_grad)

    def unfreeze_pool(self) -> list[nn.Parameter]:
        """Linear-probe-then-fine-tune: make every pool-derived parameter trainable (the AKF levels'
        components and, under ``donor_residual``, the donors' whole paths) and return those that were frozen.

        Why they stay in eval mode: Dropout and BatchNorm statistics were the donors' at training time;
        a fine-tune at a small learning rate should move the weights, not re-estimate the statistics.
        The model is no longer "frozen components": ``fuse`` records the phase in ``fused.json``.
        """
        self._whole("thaw its pool")
        pool_modules = [*self.component_modules(), *self.output_head.pool_modules(self)]
        thawed = [p for m in pool_modules for p in m.parameters() if not p.requires_grad]
        for p_ in thawed:
            p_.requires_grad_(True)
        return thawed

    def component_modules(self) -> list[nn.Module]:
        """Every pool component held by the model (frozen under full/+pretrained)."""
        return [c for level in self.levels for c in level.components]

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description; with the plan, ``FusedModel.from_config`` rebuilds the architecture."""
        return {
            "format": FUSED_FORMAT,
            "plan_models": list(self.model_names),
            "model_tasks": list(self.model_tasks),
            "task_names": list(self.task_names),
            "options": self.cfg.model_dump(mode="json"),
            "embedding": self.embedding_config,
            "replaces_level0": self.replaces_level0,
            "levels": [int(level.index) for level in self.levels],
            **({"output_members": self.output_members} if self.output_members else {}),
            **({} if self.pruning.empty else {"pruned": self.pruning.config(self.task_names)}),
        }

    @classmethod
    def from_config(cls, plan: Plan, config: dict[str, Any]) -> FusedModel:
        """Rebuild the architecture ``config_dict()`` described, on ``plan`` (weights: load the state_dict)."""
        if config.get("format") != FUSED_FORMAT:
            raise EMMError(f"fused-model config has format {config.get('format')!r}, expected {FUSED_FORMAT!r}; "
                           "it was written by another EMM version: fuse again")
        if list(config.get("plan_models", [])) != list(plan.names):
            raise EMMError(f"the fused model was built on pool models {config.get('plan_models')} but the plan holds "
                           f"{plan.names}; load the plan folder it was fused from")
        try:
            cfg = AKFOptions.model_validate(config["options"])
        except Exception as exc:
            raise EMMError(f"fused-model config has an invalid 'options' section ({exc}); fuse again") from exc
        emb = config.get("embedding")
        embedding = FeatureEmbedding.from_config(emb) if emb else None
        model = cls(plan, config["model_tasks"], config["task_names"], cfg, embedding, output_members(config))
        if model.replaces_level0 != config.get("replaces_level0", model.replaces_level0):
            raise EMMError("the plan's level 0 is not what the fused model was built on; "
                           "load the plan it was fused from")
        if config.get("pruned"):
            apply_pruning(model, Pruning.from_config(config["pruned"]))
        return model

    def gate_report(self) -> list[dict[str, Any]]:
        """From the last forward: per level and task, the mean task-gate weight of each of its models, the
        fraction of rows selecting each other task and the mean MTM weight kept on the task itself.

        ``[{"level": k, "tasks": {task: {"task_gate": {model: w}, "selection": {other: frac} | None,
        "attention_own": float | None}}}]``; empty before any forward.
        """
        report = []
        for level in self.levels:
            gates = level.last_gates
            if gates is None:
                return []
            per_task = {}
            for t, task in enumerate(self.task_names):
                models = [self.model_names[i] for i in level.members[t]]
                weights = gates["task"][t].float().mean(0).tolist()
                entry: dict[str, Any] = {"task_gate": dict(zip(models, weights)), "selection": None,
                                         "attention_own": None}
                if gates["selected"] is not None:
                    sel = gates["selected"][t]
                    counts = torch.bincount(sel.cpu(), minlength=len(self.task_names)).float() / max(len(sel), 1)
                    entry["selection"] = {u: float(counts[j]) for j, u in enumerate(self.task_names) if j != t}
                    entry["attention_own"] = float(gates["attention"][t][:, 0].float().mean())
                per_task[task] = entry
            report.append({"level": int(level.index), "tasks": per_task})
        return report

    def selection_matrix(self, level: int = -1) -> Tensor:
        """[T, T]: row t = fraction of last-forward rows where task t selected each task (diagonal 0)."""
        gates = self.levels[level].last_gates if self.levels else None
        if gates is None or gates["selected"] is None:
            raise EMMError("no selection recorded: run a forward first, with an ablation that uses MTM (full or +mtm)")
        T = len(self.task_names)
        sel = gates["selected"].cpu()
        return torch.stack([torch.bincount(sel[t], minlength=T).float() / sel.shape[1] for t in range(T)])

    def fusion_probabilities(self, level: int = -1) -> Tensor:
        """[T, T]: row t = task t's fusion-gate softmax ``F_t(g)`` at ``level`` (an index into ``self.levels``),
        averaged over the last forward's rows. Entry ``[t, u]`` is how much task t's gate draws on task u's
        components (under ``fusion_gate="scaled"`` the selected task enters MTM scaled by it); ``[t, t]`` is
        what the gate keeps on the task itself. Why public: a scarce task should learn to read a rich task's
        components, and this is where that shows (``gate_report`` gives the MTM attention beside it)."""
        gates = self.levels[level].last_gates if self.levels else None
        if gates is None or gates["fusion"] is None:
            raise EMMError("no fusion gate recorded: run a forward first, with an ablation that uses MTM "
                           "(full or +mtm)")
        return gates["fusion"].float().mean(dim=1).cpu()


def output_members(config: dict[str, Any]) -> list[OutputMember]:
    """The output members ``config_dict()`` recorded, each an empty ``TreeModel`` of its recorded layout (its
    tensors come with the fused model's state dict)."""
    try:
        return [OutputMember(str(m["name"]), str(m["task"]), TreeModel.from_layout(m["layout"]), str(m["file"]),
                             str(m["sha256"])) for m in config.get("output_members", [])]
    except (KeyError, TypeError) as exc:
        raise EMMError(f"fused-model config has an invalid 'output_members' section ({exc!r}); fuse again") from exc


def build_fused(plan: Plan, model_tasks: Sequence[str], task_names: Sequence[str], cfg: AKFOptions,
                schema: Schema, outputs: Sequence[OutputMember] = ()) -> FusedModel:
    """A ``FusedModel`` whose fresh embedding (``retrain``) is sized from the data schema."""
    shapes = [tuple(s) for s in plan.input_shapes]
    if shapes != [(schema.n_sparse,), (schema.n_dense,)]:
        raise EMMError(
            f"the plan's models take inputs of per-row shapes {[list(s) for s in shapes]} but dataset "
            f"{schema.dataset!r} has {schema.n_sparse} sparse and {schema.n_dense} dense features; fuse a pool "
            "trained on this dataset"
        )
    missing = [t for t in task_names if t not in schema.task_names]
    if missing:
        raise EMMError(f"tasks {missing} are not tasks of dataset {schema.dataset!r} ({schema.task_names}); "
                       "fix fuse task names or re-ingest")
    embedding = ENTRIES.resolve(cfg.embedding).schema_embedding(plan, schema)
    return FusedModel(plan, model_tasks, task_names, cfg, embedding, outputs)
