"""An outside model in a form that needs none of its own code: a torch.fx graph over torch.nn layers.

Why this form: a pool member written by someone else (a torch-rechub model, your own class) must still
load where its code is not installed -- the registered fused model is scored in a fresh process by
``mlflow.pyfunc.load_model`` -- and EMM must still be able to *cut* it (decomposition reads a model as a
torch.fx graph of layers). TorchScript would load without the code, but a ScriptModule is opaque to
torch.fx, so it could not be decomposed; MLflow ``code_paths`` would carry the code, its imports and
its pip requirements into every registered model and still unpickle it. So EMM traces the member once,
at import, into a graph whose leaves are torch's own layers (``nn.Linear``, ``nn.Embedding``, ...),
and stores it as plain data:

- ``graph_record(gm)``: JSON -- the nodes (functions only from torch, ``operator`` and ``math``), each
  leaf layer's class (only ``torch.nn`` classes) and plain constructor attributes, every tensor's name,
  shape and dtype;
- the tensors themselves as safetensors (``emm.weights``).

``build_portable(record)`` rebuilds the module from that JSON alone (tensors zero until weights are
loaded): nothing is unpickled and no code but torch's is imported. Tracing goes through the user's
Python once, on meta tensors, so Python branches on *shapes* (torch-rechub's ``if x.dim() > 1``) are
resolved; branches on tensor *values* cannot be and are refused. ``make_portable`` checks the rebuilt
module against the original on two batch sizes before anything is written.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.experimental.meta_tracer import MetaTracer

from emm.errors import EMMError
from emm.models.tracing import ThreadSafeTracing, reproduces

GRAPH_FORMAT = "emm.graph/1"
# where a graph's functions may come from: torch and the standard library's operators, nothing else
FUNCTION_MODULES = ("torch", "torch.nn.functional", "torch._C._nn", "torch._C._linalg", "torch._C._special",
                    "torch._C._fft", "torch.functional", "torch.special", "torch.linalg", "torch.fft", "_operator",
                    "operator", "math")
BUILTIN_FUNCTIONS = ("getattr",)
# torch's parametric layers stay whole (as in EMM's decomposer), subclasses included
LEAF_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag,
                                            nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm,
                                            nn.GroupNorm)
EXTRA_LAYER_CLASSES = ("emm.models.embedding.IndexSelectEmbedding",)  # EMM's own Embedding subclass
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}


class _LayerTracer(ThreadSafeTracing, MetaTracer):
    """MetaTracer that keeps torch's parametric layers (and their subclasses) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LEAF_LAYERS) or super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, example: Sequence[Tensor], *, name: str, class_name: str) -> fx.GraphModule:
    """``module`` as an fx graph whose leaves are torch layers; shapes taken from ``example``.

    The trace runs on a meta-device copy (no real computation); the result holds meta tensors and serves
    only for ``graph_record``: its tensor paths are those of ``module``, where ``make_portable`` reads the values.
    """
    module = module.eval()
    try:
        meta_root = copy.deepcopy(module).to("meta")
    except Exception as exc:
        raise EMMError(f"pool model {name!r}: cannot copy {type(module).__name__} to trace it ({type(exc).__name__}: "
                       f"{exc}); make it copyable with copy.deepcopy") from exc
    meta_args = {p: x.to("meta") for p, x in zip(_forward_params(module), example)}
    tracer = _LayerTracer()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "could not compute metadata": only fatal where a branch needs it
            graph = tracer.trace(meta_root, meta_args)
    except Exception as exc:
        raise EMMError(
            f"pool model {name!r} ({class_name}) cannot be traced into a portable graph: "
            f"{type(exc).__name__}: {_first_line(exc)}. EMM traces the forward once with torch.fx (branches on "
            "tensor shapes are fine, branches on tensor values are not): replace `if tensor...:` by torch.where, "
            "and keep the forward to torch operations") from exc
    return fx.GraphModule(tracer.root, graph, class_name=class_name)


def _forward_params(module: nn.Module) -> list[str]:
    return list(inspect.signature(module.forward).parameters)


# ---- graph -> JSON --------------------------------------------------------------------------------------------
def graph_record(gm: fx.GraphModule, *, where: str) -> dict[str, Any]:
    """``gm`` as JSON (structure only; tensors are named here and saved apart). ``where`` names it in errors."""
    nodes, modules, tensors = [], {}, {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            modules[str(n.target)] = _module_record(gm.get_submodule(str(n.target)), f"{where}: layer {n.target!r}")
        elif n.op == "get_attr":
            tensors[str(n.target)] = _attr_record(gm, str(n.target), where)
        nodes.append({"op": n.op, "name": n.name, "target": _target(n, where),
                      "args": _value(n.args, f"{where}: node {n.name!r}"),
                      "kwargs": _value(dict(n.kwargs), f"{where}: node {n.name!r}")})
    return {"format": GRAPH_FORMAT, "class_name": type(gm).__name__, "nodes": nodes, "modules": modules,
            "tensors": tensors}


def _target(n: fx.Node, where: str) -> Any:
    if n.op != "call_function":
        return str(n.target)
    fn = n.target
    module_name, fn_name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
    allowed = module_name in FUNCTION_MODULES or (module_name == "builtins" and fn_name in BUILTIN_FUNCTIONS)
    if not allowed or _resolve(module_name, fn_name) is not fn:
        raise EMMError(f"{where}: node {n.name!r} calls {module_name}.{fn_name}, which is not a torch or operator "
                       "function; a portable graph may call only those (write that step with torch operations)")
    return {"function": f"{module_name}:{fn_name}"}


def _resolve(module_name: str | None, fn_name: str | None) -> Any:
    try:
        return getattr(importlib.import_module(str(module_name)), str(fn_name))
    except (ImportError, AttributeError):
        return None


def _module_record(m: nn.Module, where: str) -> dict[str, Any]:
    cls = type(m)
    path = f"{cls.__module__}.{cls.__qualname__}"
    if not (cls.__module__.startswith("torch.nn.") or path in EXTRA_LAYER_CLASSES):
        raise EMMError(f"{where} is a {path}, not a torch.nn layer; a portable graph keeps only torch's layers whole "
                       "(make its forward traceable so EMM traces into it)")
    if any(getattr(m, h) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")):
        raise EMMError(f"{where} has hooks registered (code that a portable graph cannot carry); remove them")
    attrs = {k: _value(v, f"{where}, attribute {k!r}") for k, v in vars(m).items() if k not in _MODULE_INTERNALS}
    return {
        "class": path,
        "attrs": attrs,
        "params": {k: None if p is None else _tensor_meta(p, requires_grad=p.requires_grad)
                   for k, p in m._parameters.items()},
        "buffers": {k: None if b is None else _tensor_meta(b) for k, b in m._buffers.items()},
        "children": {k: _module_record(c, f"{where}.{k}") for k, c in m._modules.items() if c is not None},
    }


def _attr_record(gm: fx.GraphModule, target: str, where: str) -> dict[str, Any]:
    value = gm.get_parameter(target) if _is_param(gm, target) else _get_path(gm, target)
    if not isinstance(value, Tensor):
        raise EMMError(f"{where}: attribute {target!r} is a {type(value).__name__}, not a tensor")
    kind = "parameter" if isinstance(value, nn.Parameter) else "buffer"
    return {"kind": kind, **_tensor_meta(value, requires_grad=value.requires_grad if kind == "parameter" else None)}


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
    except AttributeError:
        return False
    return True


def _get_path(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _tensor_meta(t: Tensor, requires_grad: bool | None = None) -> dict[str, Any]:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise EMMError(f"a tensor of dtype {t.dtype} cannot be stored in a portable graph")
    meta: dict[str, Any] = {"shape": list(t.shape), "dtype": dtype}
    if requires_grad is not None:
        meta["requires_grad"] = bool(requires_grad)
    return meta


def _value(v: Any, where: str) -> Any:
    """A node argument or layer attribute as JSON; refuses anything that is not plain data."""
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if isinstance(v, tuple):
        return {"tuple": [_value(x, where) for x in v]}
    if isinstance(v, list):
        return [_value(x, where) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise EMMError(f"{where}: a dict with non-string keys cannot be stored in a portable graph")
        return {"dict": {k: _value(x, where) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"slice": [_value(v.start, where), _value(v.stop, where), _value(v.step, where)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    raise EMMError(f"{where} holds a {type(v).__name__} ({v!r:.60}), which a portable graph cannot store as plain "
                   "data; compute it with torch operations in forward instead")


# ---- JSON -> module -------------------------------------------------------------------------------------------
def build_portable(record: dict[str, Any]) -> fx.GraphModule:
    """Rebuild the module ``graph_record`` described (every tensor zero: load its weights next)."""
    if not isinstance(record, dict) or record.get("format") != GRAPH_FORMAT:
        raise EMMError(f"a portable graph has format {record.get('format') if isinstance(record, dict) else None!r}, "
                       f"expected {GRAPH_FORMAT!r}; import the pool model again (`emm pretrain`)")
    root = nn.Module()
    for path, rec in record["modules"].items():
        _set_path(root, path, _build_module(rec, path))
    for path, rec in record["tensors"].items():
        value = _zeros(rec)
        parent, _, leaf = path.rpartition(".")
        owner = _ensure_path(root, parent)
        if rec["kind"] == "parameter":
            owner.register_parameter(leaf, nn.Parameter(value, requires_grad=rec.get("requires_grad", True)))
        else:
            owner.register_buffer(leaf, value)
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for node in record["nodes"]:
        args = _restore(node["args"], env)
        kwargs = _restore(node["kwargs"], env)
        target = node["target"]
        if node["op"] == "call_function":
            target = _function(target["function"])
        if node["op"] == "output":
            env[node["name"]] = graph.output(args[0])
        else:
            env[node["name"]] = graph.create_node(node["op"], target, tuple(args), kwargs, name=node["name"])
    graph.lint()
    return fx.GraphModule(root, graph, class_name=record.get("class_name", "PortableModel")).eval()


def _function(ref: str) -> Any:
    module_name, _, fn_name = ref.partition(":")
    allowed = module_name in FUNCTION_MODULES or (module_name == "builtins" and fn_name in BUILTIN_FUNCTIONS)
    fn = _resolve(module_name, fn_name) if allowed else None
    if fn is None:
        raise EMMError(f"a portable graph calls {ref!r}, which is not a torch or operator function; refusing to "
                       "load it (import the pool model again with this EMM)")
    return fn


def _build_module(rec: dict[str, Any], where: str) -> nn.Module:
    module_name, _, cls_name = rec["class"].rpartition(".")
    if not (module_name.startswith("torch.nn.") or rec["class"] in EXTRA_LAYER_CLASSES):
        raise EMMError(f"a portable graph's layer {where!r} is a {rec['class']}, not a torch.nn layer; refusing it")
    cls = _resolve(module_name, cls_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise EMMError(f"a portable graph's layer {where!r} names {rec['class']}, which this torch does not have")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in rec["attrs"].items():
        m.__dict__[k] = _restore(v, {})
    for k, meta in rec["params"].items():
        m._parameters[k] = None if meta is None else nn.Parameter(_zeros(meta), requires_grad=meta["requires_grad"])
    for k, meta in rec["buffers"].items():
        m._buffers[k] = None if meta is None else _zeros(meta)  # every buffer persistent: all of it is saved
    for k, child in rec["children"].items():
        m._modules[k] = _build_module(child, f"{where}.{k}")
    return m


def _zeros(meta: dict[str, Any]) -> Tensor:
    if meta["dtype"] not in _DTYPES:
        raise EMMError(f"a portable graph holds a tensor of dtype {meta['dtype']!r}, which EMM does not load")
    return torch.zeros(meta["shape"], dtype=_DTYPES[meta["dtype"]])


def _restore(v: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(v, list):
        return [_restore(x, env) for x in v]
    if not isinstance(v, dict):
        return v
    (tag, x), = v.items()
    if tag == "node":
        return env[x]
    if tag == "tuple":
        return tuple(_restore(y, env) for y in x)
    if tag == "dict":
        return {k: _restore(y, env) for k, y in x.items()}
    if tag == "size":
        return torch.Size(x)
    if tag == "slice":
        return slice(*(_restore(y, env) for y in x))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        return float(x)
    if tag == "dtype":
        return _DTYPES[x]
    if tag == "device":
        return torch.device(x)
    if tag == "memory_format":
        return getattr(torch, x)
    raise EMMError(f"a portable graph holds an unknown value tag {tag!r}; import the pool model again")


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    _ensure_path(root, parent).add_module(leaf, module)


def _ensure_path(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for atom in filter(None, path.split(".")):
        if atom not in obj._modules:
            obj.add_module(atom, nn.Module())
        obj = obj._modules[atom]
    return obj


# ---- the whole round trip -------------------------------------------------------------------------------------
def make_portable(module: nn.Module, examples: Sequence[Sequence[Tensor]], *, name: str,
                  class_name: str) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Trace ``module``, rebuild it from its JSON record with its tensors copied in, and check the rebuilt
    module gives exactly the original's outputs on every batch of ``examples`` (use two batch sizes: a
    graph that froze the batch size fails here, not at scoring time)."""
    gm = trace(module, examples[0], name=name, class_name=class_name)
    record = graph_record(gm, where=f"pool model {name!r}")
    portable = build_portable(record)
    with torch.no_grad():
        for key, tensor in list(portable.named_parameters()) + list(portable.named_buffers()):
            tensor.copy_(_get_path(module, key))  # the trace ran on a copy: the paths are the module's own
        for batch in examples:
            want, got = module(*batch), portable(*batch)
            if not reproduces(got, want):
                raise EMMError(
                    f"pool model {name!r}: its traced graph does not reproduce the model on a batch of {len(batch[0])} "
                    "rows (a Python branch on the batch size or on tensor values was frozen at trace time?); make "
                    "the forward depend on shapes only through torch operations")
    return portable, record


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["GRAPH_FORMAT", "build_portable", "graph_record", "make_portable", "trace"]
