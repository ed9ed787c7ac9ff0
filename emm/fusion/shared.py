"""AKF level 0 computed once per batch for itself and the donors while the fused model trains (issue 25).

Why: with a donor head (``donor_residual``, ``cross_residual``) and level 0 fused on the raw ``(sparse, dense)``
(the pool's embeddings are not embedding-only, so ``retrain`` keeps them), every donor's path starts with the very
module AKF level 0 runs as that donor's component, on the same rows: each batch computed them twice. The saved
model shares them for good (``emm.fusion.prune``, ``shared_level0``); a model in training is whole, so it may hand
level 0's outputs to the donors only while the two copies are still one computation: the same module by
``prune.level0_shareable`` (same code, hyper-parameters, tensors, eval mode) and frozen, none of their parameters
asking for a gradient. A fine-tune phase that thaws the pool ends it (each copy must then get its own gradient);
the ``+mtm``/``baseline`` ablations, whose level-0 components are re-drawn and trainable, never start it. The
outputs handed over are the ones the donors would compute, bit for bit, and carry no gradient either way, so logits
and gradients are those of the unshared forward.

The proof compares every tensor of both copies; rather than repeat it every batch, it is kept until something it
rests on changes (then taken again): a module replaced, a tensor replaced or written in place (torch's version
counter: a checkpoint loaded, a donor's copy moved), a parameter thawed, a mode switched.
"""

from __future__ import annotations

from typing import Any

from emm.fusion.prune import level0_shareable

FusedModel = Any  # ``emm.fusion.fused.FusedModel``, which imports this module


class Level0Sharing:
    """Whether a whole fused model's donors may take AKF level 0's outputs now (``holds``), the proof cached."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._held: list[Any] = []  # what the key names by id, kept alive so that no other object takes its id
        self._holds = False

    def holds(self, model: FusedModel) -> bool:
        found = _what_the_proof_rests_on(model)
        if found is None:
            return False
        key, objects = found
        if key != self._key:
            self._key, self._held, self._holds = key, objects, level0_shareable(model)
        return self._holds


def _what_the_proof_rests_on(model: FusedModel) -> tuple[tuple[Any, ...], list[Any]] | None:
    """Every fact ``level0_shareable`` read, cheaply: the modules' identities and modes, and each tensor's identity
    and version (the key, and the objects it names by id); None when sharing is out of the question (no donors or
    levels, or a parameter that trains)."""
    donors = getattr(model, "donors", None)
    if donors is None or not model.levels or model.replaces_level0:
        return None
    level = model.levels[0]
    firsts = [path[0] for path in donors.paths if len(path)]
    key: list[Any] = [type(model.output_head), level.index, level.frozen, tuple(map(id, level.pre)),
                      donors.shares_first, tuple(donors.kept)]
    objects: list[Any] = [*level.pre]
    for module in [*level.components, *firsts]:
        key += [id(module), module.training]
        objects.append(module)
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.requires_grad or tensor.is_inference():  # trains, or keeps no version count to watch
                return None
            key.append((id(tensor), tensor._version))
            objects.append(tensor)
    return tuple(key), objects
