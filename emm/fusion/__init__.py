"""Fusion of trained single-task models: decomposition into aligned components (Algorithm 1), storage,
the fused multi-task model (AKF levels, Algorithm 2) wired from recipe parts (``emm.fusion.recipes``), and the
fuse procedure that trains it (``emm.fusion.procedure``: a plan apart from the runner that executes it).

Only the decomposition's names are imported with the package; the others are loaded on first use (PEP 562).
Why: importing any ``emm.fusion`` module (``emm.fusion.options``, read with every params.yaml; the saved fused
model ``emm predict`` rebuilds) runs this file first, and the fuse procedure pulls in the trainer and what it
needs to train, which a process that only scores never uses. Why the decomposition stays eager: its function
``decompose`` has the name of its subpackage, and a lazy name would lose to the subpackage, which the import
system sets here as soon as any module imports ``emm.fusion.decompose``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emm.fusion.decompose import (
    LayerSignature,
    Level,
    ModelTrace,
    Plan,
    Span,
    TracedLayer,
    decompose,
    plan_from_traces,
    trace_model,
)
from emm.lazy import lazy_getattr

if TYPE_CHECKING:
    from emm.fusion.akf import AKFLevel, MultiTaskMerge
    from emm.fusion.fused import FusedModel, build_fused
    from emm.fusion.procedure import FusePlan, FuseRunner
    from emm.fusion.store import load_plan, save_plan

# lazily exported name -> the module that defines it
_LAZY = {
    "AKFLevel": "emm.fusion.akf",
    "MultiTaskMerge": "emm.fusion.akf",
    "FusedModel": "emm.fusion.fused",
    "build_fused": "emm.fusion.fused",
    "FusePlan": "emm.fusion.procedure",
    "FuseRunner": "emm.fusion.procedure",
    "load_plan": "emm.fusion.store",
    "save_plan": "emm.fusion.store",
}

__all__ = sorted([*_LAZY, "LayerSignature", "Level", "ModelTrace", "Plan", "Span", "TracedLayer", "decompose",
                  "plan_from_traces", "trace_model"])


__getattr__ = lazy_getattr(__name__, _LAZY)
