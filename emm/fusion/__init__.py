"""Fusion of trained single-task models: decomposition into aligned components (Algorithm 1), storage,
the fused multi-task model (AKF levels, Algorithm 2) wired from recipe parts (``emm.fusion.recipes``), and the
fuse procedure that trains it (``emm.fusion.procedure``: a plan apart from the runner that executes it)."""

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
from emm.fusion.akf import AKFLevel, MultiTaskMerge
from emm.fusion.fused import FusedModel, build_fused
from emm.fusion.procedure import FusePlan, FuseRunner
from emm.fusion.store import load_plan, save_plan

__all__ = [
    "AKFLevel",
    "FusePlan",
    "FuseRunner",
    "FusedModel",
    "LayerSignature",
    "Level",
    "ModelTrace",
    "MultiTaskMerge",
    "Plan",
    "Span",
    "TracedLayer",
    "build_fused",
    "decompose",
    "load_plan",
    "plan_from_traces",
    "save_plan",
    "trace_model",
]
