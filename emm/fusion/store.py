"""Save a decomposition plan as JSON + safetensors, and load it back without pickle.

Layout of a plan folder::

    plan.json                    Plan.to_dict(): levels, shapes, layer ranges, every model's trace
    manifest.json                one entry per model and level (and head): task, shapes, file, params
    model{i}.level{k}.safetensors
    model{i}.head.safetensors
    adapters.safetensors         only with align="project"

``manifest.json`` may also record what the plan was ``made_from`` (the pipeline: a digest of the pool it
was cut from); ``load_plan`` given ``made_from`` refuses a store made from anything else, so a stage never
runs silently on components an older pool left behind.

Why no pickle: ``torch.load`` of a pickled module runs code from the file. Only *weights* are stored
(safetensors is plain data); the component *structure* is re-derived from freshly built models of the
same architectures, and the re-derived plan must match ``plan.json`` layer for layer. So a checkpoint
can never be loaded silently into another architecture or data schema (say, a vocabulary that grew):
the first differing layer is named in the error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from emm.errors import EMMError
from emm.fusion.decompose import PLAN_FORMAT, Plan, as_inputs, plan_from_traces, trace_model
from emm.io import atomic_dir, first_difference
from emm.weights import _dedupe_state, load_module, save_module  # noqa: F401 (re-exported)

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "emm.components/1"
ADAPTERS_FILE = "adapters.safetensors"


def save_plan(
    plan: Plan, folder: str | Path, *, model_names: Sequence[str] | None = None, tasks: Sequence[str],
    made_from: dict[str, Any] | None = None,
) -> Path:
    """Write ``plan`` to ``folder`` (replaced atomically); returns the folder.

    ``model_names`` (default: ``plan.names``) and ``tasks`` give one label per model for the manifest;
    ``made_from`` (JSON) is recorded in it for ``load_plan`` to compare.
    """
    model_names = list(plan.names if model_names is None else model_names)
    tasks = list(tasks)
    for label, values in (("model_names", model_names), ("tasks", tasks)):
        if len(values) != plan.num_models:
            raise EMMError(
                f"save_plan got {len(values)} {label} for a plan of {plan.num_models} models; pass one per model"
            )
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        entries = []
        for i in range(plan.num_models):
            for k, component in enumerate(plan.components[i]):
                span = plan.levels[k].spans[i]
                entries.append(_entry(i, model_names[i], tasks[i], k, span, f"model{i}.level{k}.safetensors"))
                save_module(component, tmp / entries[-1]["file"])
            head_file = f"model{i}.head.safetensors"
            entries.append(_entry(i, model_names[i], tasks[i], "head", plan.head_spans[i], head_file))
            save_module(plan.heads[i], tmp / entries[-1]["file"])
        adapters = None
        if plan.adapters is not None:
            adapters = ADAPTERS_FILE
            save_module(_adapter_bundle(plan), tmp / ADAPTERS_FILE)
        manifest = {"format": MANIFEST_FORMAT, "plan": PLAN_FILE, "entries": entries, "adapters": adapters}
        if made_from is not None:
            manifest["made_from"] = made_from
        _write_json(tmp / PLAN_FILE, plan.to_dict())
        _write_json(tmp / MANIFEST_FILE, manifest)
    return folder


def load_plan(folder: str | Path, models: Sequence[nn.Module], example_input: tuple[Tensor, ...] | Tensor, *,
              made_from: dict[str, Any] | None = None) -> Plan:
    """Rebuild a saved plan on freshly constructed ``models`` and load the saved weights into it.

    The models only provide structure (their own weights are ignored); they must be the same
    architectures, in the same order, as when the plan was saved. Given ``made_from``, the manifest must
    record the same (``save_plan``), else the store is stale and refused.
    """
    folder = Path(folder)
    saved = _read_json(folder / PLAN_FILE)
    manifest = _read_json(folder / MANIFEST_FILE)
    _check_formats(folder, saved, manifest)
    if made_from is not None:
        _check_made_from(folder, manifest, made_from)
    names = list(saved["models"])
    if len(models) != len(names):
        raise EMMError(
            f"{folder / PLAN_FILE} holds {len(names)} models ({', '.join(names)}) but {len(models)} were given; "
            "pass freshly built models of the same architectures, in the same order"
        )
    inputs = as_inputs(example_input)
    _check_input_shapes(folder, saved, inputs)
    traces = []
    for i, (model, name) in enumerate(zip(models, names)):
        trace = trace_model(model, inputs, name=name, head=saved.get("head"))
        _check_trace(folder, saved["traces"][i], trace.to_dict(), name)
        traces.append(trace)
    levels = saved["num_levels"] if saved["align"] == "project" else None
    plan = plan_from_traces(traces, inputs, align=saved["align"], levels=levels)
    plan.head = saved.get("head")
    _check_same_plan(folder, saved, plan.to_dict())
    for entry in manifest["entries"]:
        load_module(_entry_module(plan, entry, folder), folder / entry["file"])
    if manifest.get("adapters"):
        load_module(_adapter_bundle(plan), folder / manifest["adapters"])
    return plan


# --------------------------------------------------------------------------------------------- #
# Manifest and checks
# --------------------------------------------------------------------------------------------- #


def _entry(i: int, name: str, task: str, level: int | str, span: Any, file: str) -> dict[str, Any]:
    return {
        "model_index": i,
        "model": name,
        "task": task,
        "level": level,
        "in_shapes": [list(s) for s in span.in_shapes],
        "out_shape": None if span.out_shape is None else list(span.out_shape),
        "file": file,
        "num_params": span.num_params,
    }


def _entry_module(plan: Plan, entry: dict[str, Any], folder: Path) -> nn.Module:
    i, level = entry.get("model_index"), entry.get("level")
    if not isinstance(i, int) or not 0 <= i < plan.num_models:
        raise EMMError(
            f"{folder / MANIFEST_FILE}: entry {entry.get('file')!r} names model index {i!r} outside the plan"
        )
    if level == "head":
        return plan.heads[i]
    if not isinstance(level, int) or not 0 <= level < plan.num_levels:
        raise EMMError(f"{folder / MANIFEST_FILE}: entry {entry.get('file')!r} names level {level!r} outside the plan")
    return plan.components[i][level]


def _adapter_bundle(plan: Plan) -> nn.Module:
    bundle = nn.Module()
    bundle.into = plan.adapters
    bundle.back = plan.inverse_adapters
    return bundle


def _check_formats(folder: Path, saved: dict[str, Any], manifest: dict[str, Any]) -> None:
    if saved.get("format") != PLAN_FORMAT:
        raise EMMError(
            f"{folder / PLAN_FILE} has format {saved.get('format')!r}, expected {PLAN_FORMAT!r}; re-run decompose"
        )
    if manifest.get("format") != MANIFEST_FORMAT:
        raise EMMError(
            f"{folder / MANIFEST_FILE} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}; "
            "re-run decompose"
        )


def _check_made_from(folder: Path, manifest: dict[str, Any], made_from: dict[str, Any]) -> None:
    """Why: the components are frozen into the fused model; from another pool they would fuse that pool."""
    recorded = manifest.get("made_from")
    if recorded is None:
        raise EMMError(f"{folder / MANIFEST_FILE} records no pool it was made from (written by an older EMM), so "
                       "it cannot be told apart from components another pool left behind; re-run decompose")
    path = _first_difference(recorded, made_from, "made_from")
    if path is not None:
        raise EMMError(f"the components in {folder} were made from another pool than the one given ({path}: "
                       "recorded vs now); they are stale: re-run decompose (`emm decompose`)")


def _check_input_shapes(folder: Path, saved: dict[str, Any], inputs: tuple[Tensor, ...]) -> None:
    given = [list(x.shape[1:]) for x in inputs]
    if given != saved["input_shapes"]:
        raise EMMError(
            f"example_input has per-row shapes {given} but the plan in {folder} was saved for {saved['input_shapes']}; "
            "pass a batch built with the same data schema"
        )


def _check_trace(folder: Path, saved: dict[str, Any], now: dict[str, Any], name: str) -> None:
    """Compare one model's layers with the saved ones; name the first layer that differs.

    Only structure is compared (name, signature, cut shape), not the human-readable ``no_cut`` notes.
    """
    if saved["model_type"] != now["model_type"]:
        raise EMMError(
            f"model {name!r}: the plan in {folder} was saved from a {saved['model_type']}, the given model is a "
            f"{now['model_type']}; pass the same architecture, in the same order"
        )
    for index, (old, new) in enumerate(zip(saved["layers"], now["layers"])):
        if _structure(old) != _structure(new):
            raise EMMError(
                f"model {name!r}: layer {index} is {_describe(old)} in the plan saved in {folder} but {_describe(new)} "
                "in the given model (another architecture or data schema?); build the model with the configuration "
                "it was trained with"
            )
    if len(saved["layers"]) != len(now["layers"]):
        raise EMMError(
            f"model {name!r}: the plan saved in {folder} has {len(saved['layers'])} layers, the given model "
            f"{len(now['layers'])}; build the model with the configuration it was trained with"
        )


def _structure(layer: dict[str, Any]) -> tuple[Any, ...]:
    return (layer.get("name"), layer.get("signature"), layer.get("cut_shape"))


def _check_same_plan(folder: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Traces already match, so this only trips on a plan written by an EMM with other cut rules."""
    keys = ("align", "num_levels", "levels", "heads", "adapters")
    path = _first_difference({k: saved.get(k) for k in keys}, {k: now.get(k) for k in keys})
    if path is not None:
        raise EMMError(
            f"the plan re-derived from the given models differs from {folder / PLAN_FILE} at {path}; it was "
            "probably written by another EMM version: re-run decompose"
        )


def _first_difference(a: Any, b: Any, path: str = "plan") -> str | None:
    """``emm.io.first_difference`` as the store's messages word it (a list of another length by its lengths)."""
    found = first_difference(a, b, path)
    if found is None:
        return None
    where, x, y = found
    if isinstance(x, list) and isinstance(y, list):
        return f"{where} (length {len(x)} vs {len(y)})"
    return f"{where} ({x!r} vs {y!r})"


def _describe(layer: dict[str, Any]) -> str:
    sig = layer["signature"]
    ins = ", ".join(str(s) for s in sig["in_shapes"])
    return f"{layer['name']!r} {sig['type']}({sig['hparams']}) {ins}->{sig['out_shape']}"


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise EMMError(f"{path} is missing; point load_plan at a folder written by save_plan")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EMMError(f"cannot read {path} ({exc}); save the plan again") from exc
    if not isinstance(data, dict):
        raise EMMError(f"{path} does not hold a JSON object; save the plan again")
    return data
