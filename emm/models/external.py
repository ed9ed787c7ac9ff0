"""Pool members trained outside EMM: how params.yaml names them, how they are loaded and checked, and the
adapter that presents them as EMM models.

A ``pretrain.pool.<dataset>`` entry is one of these kinds, told apart by its keys:
- built-in ``{name, task, arch, ...}`` (``emm.models.single_task.ModelSpec``), trained by ``emm pretrain``;
- MLflow ``{name, task, uri, ...}`` (``UriMember``): ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or
  ``runs:/RUN_ID/PATH``, a model logged with ``mlflow.pytorch.log_model``, or a LightGBM / XGBoost model logged
  with ``mlflow.lightgbm`` / ``mlflow.xgboost`` (a tree member, ``emm.tracking.external_trees``), loaded in
  ``emm.tracking``;
- factory ``{name, task, factory: "pkg.module:build", kwargs, weights}`` (``FactoryMember``): EMM imports
  and calls ``build(**kwargs)``, then loads a safetensors file (or a ``.pt`` state dict, read with
  ``weights_only=True``) into it;
- a tree model from its native file, ``{name, task, lightgbm: model.txt}`` or ``{name, task, xgboost:
  model.json}`` (``TreeFileMember``), scored as a frozen ``emm.models.trees.TreeModel``; and a built-in tree
  ``{name, task, arch: lightgbm, ...}`` (``emm.models.trees.LightGBMSpec``), trained by ``emm pretrain``.
  Trees are never decomposed: they join the fused model at the output.
Outside models are imported, checked and recorded, never retrained. Each declares ``inputs`` (``tensors``
or ``dict``, see ``emm.data.batches``) and ``output`` (``logit`` or ``probability``, shape [B] or [B, 1]);
``ExternalAdapter`` turns that into EMM's ``(sparse, dense) -> logits [B, 1]``.

Why checks before anything is written: a model that silently reads other indices, or returns another
shape, would produce numbers, not errors. ``check_member`` runs it on validation rows plus one row with
every feature at its largest index, and names the feature, the call or the shape that does not fit.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import Tensor, nn

from emm.data.batches import encoding_differences, to_dict
from emm.data.schema import Schema
from emm.errors import EMMError
from emm.io import pinned_sha256
from emm.models.names import MemberName
from emm.models.single_task import ModelSpec
from emm.models.trees import LightGBMSpec, TreeFileMember

log = logging.getLogger(__name__)
PROBABILITY_EPS = 1e-7  # probabilities are clamped this far inside (0, 1) before the logit
URI_PATTERN = re.compile(r"^(models:/[^/@]+(/\d+|@[\w.-]+)|runs:/[0-9a-f]+/.+)$")
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ExternalMember(BaseModel):
    """What every outside pool member declares."""

    model_config = ConfigDict(extra="forbid")

    name: MemberName
    task: str
    inputs: Literal["tensors", "dict"] = Field(
        default="tensors", description="tensors = (sparse [B, n_sparse] global indices, dense [B, n_dense]); "
        "dict = {feature: tensor [B]} with local indices (see emm.data.batches)")
    output: Literal["logit", "probability"] = Field(default="logit", description="what forward returns, [B] or [B, 1]")


class UriMember(ExternalMember):
    """A model logged with ``mlflow.pytorch.log_model``, ``mlflow.lightgbm.log_model`` or ``mlflow.xgboost.log_model``
    (a tree member: ``emm.tracking.external_trees``), or a built-in pool model EMM registered."""

    uri: str = Field(description="models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH")
    trust_pickle: bool = Field(
        default=False, description="allow loading a model stored as a Python object: mlflow.pytorch's pickle format "
        "and mlflow.lightgbm's scikit-learn wrapper (skops or pickle) build objects the artifact store chose when "
        "loaded, so only set this for a store and a model you trust")

    @field_validator("uri")
    @classmethod
    def _uri(cls, uri: str) -> str:
        if not URI_PATTERN.match(uri):
            raise ValueError(f"uri {uri!r} is not models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH")
        return uri


class FactoryMember(ExternalMember):
    """Your own builder function plus a weights file."""

    factory: str = Field(description="pkg.module:function, importable (installed or on PYTHONPATH)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the factory as keyword arguments")
    weights: Path = Field(description="a .safetensors file, or a .pt/.pth state dict (read with weights_only=True)")
    weights_sha256: str | None = Field(
        default=None, description="pin the weights file: a file with other bytes is refused (EMM fills it in when "
        "unset, so every record and cache key names the exact file)")

    @field_validator("factory")
    @classmethod
    def _factory(cls, factory: str) -> str:
        if not FACTORY_PATTERN.match(factory):
            raise ValueError(f"factory {factory!r} is not 'pkg.module:function'")
        return factory


Member = ModelSpec | LightGBMSpec | UriMember | FactoryMember | TreeFileMember
KINDS = ("arch", "uri", "factory", "lightgbm", "xgboost")


def parse_member(raw: Any, where: str) -> Member:
    """One ``pretrain.pool`` entry -> its typed form; the error names the entry and what is wrong with it."""
    if not isinstance(raw, Mapping):
        raise EMMError(f"{where} is a {type(raw).__name__}, not a mapping like {{name, task, arch}}")
    kinds = [k for k in KINDS if k in raw]
    label = f"{where} ({raw.get('name')!r})" if raw.get("name") else where
    if len(kinds) != 1:
        raise EMMError(f"{label} must have exactly one of `arch` (built-in, trained by EMM), `uri` (an MLflow model), "
                       f"`factory` (your builder + weights), `lightgbm` (a LightGBM text model) or `xgboost` (an "
                       f"XGBoost JSON model); it has {kinds or 'none'}")
    cls = {"arch": LightGBMSpec if raw.get("arch") == "lightgbm" else ModelSpec, "uri": UriMember,
           "factory": FactoryMember, "lightgbm": TreeFileMember, "xgboost": TreeFileMember}[kinds[0]]
    try:
        return cls.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors())
        raise EMMError(f"{label} is not a valid {kinds[0]} entry: {problems}") from exc


def source_of(member: Member) -> str:
    if isinstance(member, (ModelSpec, LightGBMSpec)):
        return "builtin"
    return "mlflow" if isinstance(member, UriMember) else "file" if isinstance(member, TreeFileMember) else "factory"


# ---- factory + weights --------------------------------------------------------------------------------------
def pin_weights(member: FactoryMember) -> FactoryMember:
    """The entry with ``weights_sha256`` filled in (checked against the file when the user pinned it)."""
    sha = pinned_sha256(Path(member.weights), member.weights_sha256, owner=f"pool model {member.name!r}",
                        key="weights", pin_key="weights_sha256")
    return member.model_copy(update={"weights_sha256": sha})


def _in_stdlib(module_name: str) -> bool:
    """Whether a module belongs to Python's standard library (``posix``, ``builtins`` and ``_io`` included).

    Why by name (``sys.stdlib_module_names``) and not by file: the built-in and frozen modules have no file,
    and an interpreter's site-packages may live inside its standard-library folder."""
    return module_name.partition(".")[0] in sys.stdlib_module_names


def resolve_factory(member: FactoryMember) -> Any:
    """The function or class ``member.factory`` names, imported but not called; refuses the standard library.

    Why: the entry's kwargs are passed to whatever it names, so ``subprocess:run`` or ``shutil:rmtree`` in a
    params.yaml would run a command or delete a folder. Nothing in the standard library builds a torch model,
    so every one of its modules is refused before import, and the imported object is refused too when it
    comes from there (a user module that re-exports ``subprocess.run``). Code the user names in their own
    modules is trusted like any package they install (README, "Factory + weights")."""
    module_name, fn_name = member.factory.split(":")
    where = f"pool model {member.name!r}: factory {member.factory!r}"
    fix = ("a factory entry calls the function it names with your kwargs, so EMM refuses the standard library's "
           "(they run processes, touch files, evaluate code); name your own function that builds the model")
    if _in_stdlib(module_name):
        raise EMMError(f"{where} is in Python's standard library (module {module_name.partition('.')[0]!r}); {fix}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EMMError(f"{where} is not importable ({exc}); install the package that holds {module_name!r} or put "
                       f"its folder on PYTHONPATH") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise EMMError(f"pool model {member.name!r}: module {module_name!r} has no function {fn_name!r} "
                       f"(factory {member.factory!r})")
    if not (inspect.isfunction(fn) or inspect.isclass(fn)):
        raise EMMError(f"{where} is a {type(fn).__name__}, not a function or class; name the function (or "
                       f"nn.Module class) that builds the model")
    origin = getattr(fn, "__module__", None) or ""
    if _in_stdlib(origin):
        raise EMMError(f"{where} is {origin}.{fn.__qualname__}, from Python's standard library; {fix}")
    return fn


def build_factory_model(member: FactoryMember) -> nn.Module:
    """Import and call the factory (said in the log, with its kwargs), then load the weights file into what
    it returns (strictly)."""
    fn = resolve_factory(member)
    log.info("pool model %r: calling factory %s(**%r)", member.name, member.factory, member.kwargs)
    try:
        model = fn(**member.kwargs)
    except Exception as exc:
        raise EMMError(f"pool model {member.name!r}: {member.factory}(**{member.kwargs}) raised "
                       f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise EMMError(f"pool model {member.name!r}: {member.factory} returned a {type(model).__name__}, not a "
                       "torch.nn.Module")
    load_state(model, read_state(Path(member.weights), member.name), Path(member.weights), member.name)
    return model.eval()


def read_state(path: Path, name: str) -> dict[str, Tensor]:
    """A state dict from safetensors, or from a .pt/.pth file without unpickling code (``weights_only``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EMMError(f"pool model {name!r}: cannot read weights {path} ({type(exc).__name__}: {_first_line(exc)}); "
                       "save a state dict: safetensors.torch.save_file(model.state_dict(), path) or "
                       "torch.save(model.state_dict(), path)") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise EMMError(f"pool model {name!r}: {path} does not hold a state dict (name -> tensor); save "
                       "model.state_dict(), not the model object")
    return dict(state)


def load_state(model: nn.Module, state: dict[str, Tensor], path: Path, name: str) -> None:
    """``load_state_dict`` strictly, with every missing, unexpected and mis-shaped key named."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or extra or shapes:
        parts = [f"missing {_few(missing)}" if missing else "", f"unexpected {_few(extra)}" if extra else "",
                 f"other shapes {_few(shapes)}" if shapes else ""]
        raise EMMError(f"pool model {name!r}: the weights in {path} do not fit the model the factory built ("
                       + "; ".join(p for p in parts if p) + "); build it with the kwargs it was trained with")
    model.load_state_dict(state, strict=True)


# ---- encoding ----------------------------------------------------------------------------------------------
def check_encoding(record: dict[str, Any] | None, schema: Schema, name: str, where: str) -> bool:
    """Refuse a model recorded on another encoding (naming what differs); warn about one with no record.
    Returns whether an encoding was recorded."""
    if record is None:
        log.warning("pool model %r: no recorded data encoding (%s); EMM checks it by shape and one forward pass only. "
                    "Record it when training: emm.data.batches.save_encoding(weights, data_dir) or, for MLflow, "
                    "emm.tracking.external.log_encoding(data_dir)", name, where)
        return False
    differences = encoding_differences(record, schema)
    if differences:
        raise EMMError(f"pool model {name!r} was trained on another data encoding ({where}: fingerprint "
                       f"{record.get('fingerprint')}) than {schema.dataset!r} has now ({schema.fingerprint()}): "
                       + "; ".join(differences) + ". Retrain it on the current ingest (emm.data.batches.UserBatches) "
                       "or re-ingest the data it was trained on")
    return True


# ---- the adapter and the checks ----------------------------------------------------------------------------
class ExternalAdapter(nn.Module):
    """EMM's ``(sparse, dense) -> logits [B, 1]`` around a model with its own input and output convention.

    ``dict`` inputs are built per feature (``sparse[:, j] - offset_j``) with the offsets as plain numbers, so
    the traced graph holds them as constants and needs no buffer.
    """

    def __init__(self, model: nn.Module, schema: Schema, *, inputs: str, output: str) -> None:
        super().__init__()
        self.model = model
        self.inputs, self.output = inputs, output
        self.sparse_features = [(f.name, f.offset) for f in schema.sparse]
        self.dense_features = [f.name for f in schema.dense]

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        if self.inputs == "dict":
            x = {}
            for j, (name, offset) in enumerate(self.sparse_features):
                x[name] = sparse[:, j] - offset
            for k, name in enumerate(self.dense_features):
                x[name] = dense[:, k]
            out = self.model(x)
        else:
            out = self.model(sparse, dense)
        out = out.reshape(-1, 1)
        if self.output == "probability":
            out = torch.logit(out.clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS))
        return out


class _IndexMisfit(Exception):
    """Raised from an embedding pre-hook: the message is the user-facing explanation."""


def probe_batch(schema: Schema, sparse: Tensor, dense: Tensor) -> tuple[Tensor, Tensor]:
    """``(sparse, dense)`` plus one row with every sparse feature at its largest index (``vocab_size - 1``)."""
    top = torch.tensor([[f.offset + f.vocab_size - 1 for f in schema.sparse]], dtype=sparse.dtype)
    return torch.cat([sparse, top]), torch.cat([dense, dense[:1]])


def call_description(member: ExternalMember, schema: Schema) -> str:
    if member.inputs == "dict":
        return (f"model(x) with x a dict of {schema.n_sparse + schema.n_dense} features name -> tensor [B] "
                f"({schema.n_sparse} sparse LongTensors of local indices 0..vocab_size-1, {schema.n_dense} dense "
                "FloatTensors), because `inputs: dict`")
    return (f"model(sparse, dense) with sparse a LongTensor [B, {schema.n_sparse}] of global indices < "
            f"{schema.total_vocab} and dense a FloatTensor [B, {schema.n_dense}], because `inputs: tensors`")


def check_member(model: nn.Module, member: ExternalMember, schema: Schema, sparse: Tensor, dense: Tensor) -> None:
    """Run the raw model on validation rows (+ the largest indices) the way the adapter will; refuse what
    does not fit: an embedding too small for a feature, a forward that raises, another output shape or range."""
    sparse, dense = probe_batch(schema, sparse, dense)
    x = to_dict(sparse, dense, schema) if member.inputs == "dict" else None
    hooks = [m.register_forward_pre_hook(_index_guard(path, m, schema, x, member.name))
             for path, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    try:
        with torch.no_grad():
            out = model(x) if x is not None else model(sparse, dense)
    except _IndexMisfit as misfit:
        raise EMMError(str(misfit)) from None
    except Exception as exc:
        raise EMMError(f"pool model {member.name!r}: its forward raised {type(exc).__name__}: {_first_line(exc)}. "
                       f"EMM called {call_description(member, schema)}; fix `inputs:` or the model") from exc
    finally:
        for h in hooks:
            h.remove()
    rows = sparse.shape[0]
    if not isinstance(out, Tensor):
        raise EMMError(f"pool model {member.name!r} returned a {type(out).__name__}; EMM expects one tensor of "
                       f"shape [B] or [B, 1] (one {member.output} per row for task {member.task!r})")
    if tuple(out.shape) not in ((rows,), (rows, 1)):
        raise EMMError(f"pool model {member.name!r} returned shape {list(out.shape)} for B={rows} rows; EMM expects "
                       f"[B] or [B, 1] (one {member.output} per row for task {member.task!r}). A multi-task model: "
                       "wrap it so forward returns the one task's column")
    if not torch.isfinite(out).all():
        raise EMMError(f"pool model {member.name!r} returned NaN or inf for {int((~torch.isfinite(out)).sum())} of "
                       f"{rows} validation rows")
    lo, hi = float(out.min()), float(out.max())
    if member.output == "probability" and (lo < 0 or hi > 1):
        raise EMMError(f"pool model {member.name!r} is declared `output: probability` but returned values in "
                       f"[{lo:.4g}, {hi:.4g}]; set `output: logit` if forward returns raw scores")
    if member.output == "logit" and 0 <= lo and hi <= 1:
        log.warning("pool model %r is declared `output: logit` but every value is in [0, 1] (%.4g..%.4g): if it ends "
                    "in a sigmoid, set `output: probability`", member.name, lo, hi)


def _index_guard(path: str, table: nn.Module, schema: Schema, x: dict[str, Tensor] | None, name: str):
    """A forward pre-hook that names the feature whose indices do not fit ``table`` before the lookup fails."""
    rows = table.num_embeddings

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
        idx = args[0] if args else None
        if not isinstance(idx, Tensor) or idx.numel() == 0 or int(idx.max()) < rows:
            return
        feature, size = _which_feature(idx, schema, x, rows)
        if feature is None:
            raise _IndexMisfit(f"pool model {name!r}: its embedding {path!r} has {rows} rows but is looked up with "
                               f"index {int(idx.max())}; build it with the vocabulary sizes of the current schema "
                               "(emm.data.batches.feature_table)")
        raise _IndexMisfit(f"pool model {name!r}: feature {feature!r} has {size} in the data, but the model's "
                           f"embedding {path!r} has only {rows} rows; build it with the vocabulary sizes of the "
                           "current schema (emm.data.batches.feature_table)")

    return hook


def _which_feature(idx: Tensor, schema: Schema, x: dict[str, Tensor] | None, rows: int) -> tuple[str | None, str]:
    """The feature an out-of-range lookup belongs to (by identity or value for dict inputs, by column for
    EMM's [B, n_sparse] matrix: the first feature whose largest global index does not fit), and its size."""
    if x is not None:
        for f in schema.sparse:
            t = x[f.name]
            if idx is t or (idx.shape == t.shape and torch.equal(idx.long(), t.long())):
                return f.name, f"{f.vocab_size} values (local indices 0..{f.vocab_size - 1}, 0 = unseen)"
        return None, ""
    if idx.dim() >= 1 and idx.shape[-1] == schema.n_sparse:
        maxima = idx.reshape(-1, schema.n_sparse).max(0).values
        f = schema.sparse[int(torch.nonzero(maxima >= rows)[0])]
        return f.name, (f"global indices up to {f.offset + f.vocab_size - 1} (offset {f.offset} + {f.vocab_size} "
                        f"values; EMM's one table has {schema.total_vocab} rows)")
    return None, ""


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
