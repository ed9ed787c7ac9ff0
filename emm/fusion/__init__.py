"""Fusion of trained single-task models: decomposition into aligned components (Algorithm 1), storage,
and the fused multi-task model (AKF levels, Algorithm 2) wired from recipe parts (``emm.fusion.recipes``)."""

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
from emm.fusion.store import load_plan, save_plan

__all__ = [
    "AKFLevel",
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
