"""Algorithm 1 of the EMM paper: cut trained single-task models into aligned hierarchical components.

Given a pool of trained models (possibly of different structures), find the layers whose structure
every model shares, in order, and cut every model after each of them. Every model then becomes the
same number L of components plus a *head* (its task tower); components of the same level have the
same input/output shapes across models, which is what lets the AKF fusion module mix them.

The package splits the algorithm by concern, each module documenting its part:

- ``records``: the data a decomposition produces (``Plan``, ``Level``, ``Span``, traces, ``PLAN_FORMAT``);
- ``plan``: the entry points ``decompose``, ``trace_model``, ``plan_from_traces``;
- ``layers``: what counts as a layer and when a layer may never be cut after;
- ``fx_reader``: reading a model as a torch.fx graph and where a cut goes (the normal path);
- ``hook_reader``: the forward-hook fallback for models fx cannot trace, and its ``Chain`` components;
- ``alignment``: ``align="identical"`` (the paper) and ``align="project"`` (adapters, beyond it);
- ``checks``: argument and example-batch checks, and the exactness check on every plan;
- ``description``: the per-model spans and per-level shapes that plans report and store.

If neither reader can describe a model, an ``EMMError`` names the model and the module that could
not be traced. Everything public is re-exported here, so callers import from
``emm.fusion.decompose`` and need not know the module layout.
"""

from emm.fusion.decompose.checks import as_inputs
from emm.fusion.decompose.hook_reader import Chain
from emm.fusion.decompose.plan import decompose, plan_from_traces, trace_model
from emm.fusion.decompose.records import (
    ALIGN_MODES,
    PLAN_FORMAT,
    LayerSignature,
    Level,
    ModelTrace,
    Plan,
    Shape,
    Span,
    TracedLayer,
)

__all__ = [
    "ALIGN_MODES",
    "PLAN_FORMAT",
    "Chain",
    "LayerSignature",
    "Level",
    "ModelTrace",
    "Plan",
    "Shape",
    "Span",
    "TracedLayer",
    "as_inputs",
    "decompose",
    "plan_from_traces",
    "trace_model",
]
