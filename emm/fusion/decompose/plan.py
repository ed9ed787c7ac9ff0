"""The entry points of Algorithm 1: read every model, align them, cut them, check the result.

``decompose`` is the one-call form. ``trace_model`` and ``plan_from_traces`` are its two halves, kept
public because ``emm.fusion.store`` re-derives a saved plan's structure from freshly built models
(traces) and compares it with the saved description before loading weights into it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn

from emm.errors import EMMError
from emm.fusion.decompose.alignment import align_identical, align_project, build_adapters
from emm.fusion.decompose.checks import as_inputs, check_align, check_exact, check_names, run_example
from emm.train.modes import eval_mode
from emm.fusion.decompose.description import model_spans, plan_levels
from emm.fusion.decompose.fx_reader import FxProgram
from emm.fusion.decompose.hook_reader import ChainProgram
from emm.fusion.decompose.layers import Untraceable
from emm.fusion.decompose.records import ModelTrace, Plan, Program, Span, strip_batch


def decompose(
    models: Sequence[nn.Module],
    example_input: tuple[Tensor, ...] | Tensor,
    *,
    names: Sequence[str] | None = None,
    align: str = "identical",
    levels: int | None = None,
    head: str | None = None,
) -> Plan:
    """Algorithm 1: cut every model after each common layer into L aligned components plus a head.

    ``example_input`` is one batch in the models' calling convention, e.g. ``(sparse, dense)``;
    it fixes the shapes in the signatures. ``levels`` is only for ``align="project"``. ``head`` is a
    sub-module name (e.g. ``"tower"``): no cut is made inside it, so each model's head is at least that
    whole module (identical tower layers would otherwise become a level of their own).
    """
    inputs = as_inputs(example_input)
    names = check_names(models, names)
    check_align(align, levels)
    traces = [trace_model(model, inputs, name=name, head=head) for model, name in zip(models, names)]
    plan = plan_from_traces(traces, inputs, align=align, levels=levels)
    plan.head = head
    return plan


def trace_model(model: nn.Module, example_input: tuple[Tensor, ...] | Tensor, *, name: str = "model",
                head: str | None = None) -> ModelTrace:
    """Read one model into signed layers and cut points (fx, else forward hooks), in eval mode.

    Layers inside the sub-module ``head`` are signed but never cut after."""
    inputs = as_inputs(example_input)
    with eval_mode(model):
        expected = run_example(model, inputs, name)
        program = _read_program(model, inputs, expected, name)
    layers = program.layers()
    if head:
        layers = [dataclasses.replace(layer, cut_shape=None, no_cut=f"inside the head module {head!r}")
                  if layer.name == head or layer.name.startswith(f"{head}.") else layer for layer in layers]
    return ModelTrace(
        name=name,
        model_type=type(model).__name__,
        method=program.method,
        layers=layers,
        opaque=list(program.opaque),
        input_shapes=tuple(strip_batch(tuple(x.shape)) for x in inputs),
        expected=expected,
        graph=program,
    )


def plan_from_traces(
    traces: Sequence[ModelTrace], inputs: tuple[Tensor, ...], *, align: str = "identical", levels: int | None = None
) -> Plan:
    """Align traced models, cut them, build components/heads/adapters and check exactness."""
    check_align(align, levels)
    if align == "identical":
        chosen, common = align_identical(traces)
        targets: list[int] | None = None
    else:
        chosen, targets = align_project(traces, levels)
        common = None
    components: list[list[nn.Module]] = []
    heads: list[nn.Module] = []
    per_model_spans: list[list[Span]] = []
    for trace, cuts in zip(traces, chosen):
        pieces, head, modules = trace.graph.build([layer.position for layer in cuts])
        check_exact(trace, pieces, head, inputs)
        components.append(pieces)
        heads.append(head)
        per_model_spans.append(model_spans(trace, cuts, pieces, head, modules))
    level_list = plan_levels(traces, chosen, common, targets, per_model_spans)
    plan = Plan(
        names=[t.name for t in traces],
        align=align,
        input_shapes=traces[0].input_shapes,
        levels=level_list,
        components=components,
        heads=heads,
        head_spans=[spans[-1] for spans in per_model_spans],
        traces=list(traces),
    )
    if targets is not None:
        plan.adapters, plan.inverse_adapters = build_adapters(chosen, targets)
    return plan


def _read_program(model: nn.Module, inputs: tuple[Tensor, ...], expected: Tensor, name: str) -> Program:
    """torch.fx first (it sees dataflow, so cuts can be proven); forward hooks only if fx fails."""
    try:
        return FxProgram.read(model, inputs, expected)
    except Untraceable as fx_failure:
        try:
            return ChainProgram.read(model, inputs, expected)
        except Untraceable as chain_failure:
            raise EMMError(
                f"model {name!r} ({type(model).__name__}) cannot be decomposed: torch.fx could not trace "
                f"{fx_failure.where} ({fx_failure.reason}), and the forward-hook fallback does not apply "
                f"({chain_failure}). Make that forward traceable (no Python `if`/`for` on tensor values; "
                "use torch.where), or build the model as an nn.Sequential chain of modules"
            ) from fx_failure
