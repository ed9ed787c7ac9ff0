"""Fusion of trained single-task models: decomposition into aligned components (Algorithm 1) and storage."""

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
from emm.fusion.store import load_plan, save_plan

__all__ = [
    "LayerSignature",
    "Level",
    "ModelTrace",
    "Plan",
    "Span",
    "TracedLayer",
    "decompose",
    "load_plan",
    "plan_from_traces",
    "save_plan",
    "trace_model",
]
