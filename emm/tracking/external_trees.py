"""Tree members that live in MLflow: a ``uri:`` to a model logged with ``mlflow.lightgbm`` or ``mlflow.xgboost``,
taken as the library's native text, which the pool then reads as it reads a tree file (``emm.models.tree_files``).

What MLflow 3 writes (``mlflow.lightgbm.save_model``, ``mlflow.xgboost.save_model``), and what EMM makes of it:
- ``mlflow.lightgbm.log_model(booster)``: flavour ``lightgbm``, ``model_class: lightgbm.basic.Booster``, ``data:
  model.lgb``, which is ``booster.save_model``'s text format: read as it is.
- ``mlflow.lightgbm.log_model(LGBMClassifier(...))``: the scikit-learn wrapper is stored as a Python object,
  ``model.skops`` (skops, MLflow's default outside Databricks) or ``model.pkl`` (``serialization_format``
  ``pickle`` / ``cloudpickle``). Loading either builds objects the artifact store chose: a pickle runs any code
  it names, and skops builds the types listed as trusted in the very MLmodel file the store serves. So it is
  refused unless the entry says ``trust_pickle: true``; then MLflow loads it and EMM keeps only its booster's
  text (``booster_.model_to_string()``), with a warning in the log.
- ``mlflow.xgboost.log_model(booster or XGBClassifier)``: flavour ``xgboost``, ``data: model.<model_format>``,
  always XGBoost's own ``save_model`` (``ubj`` by default, ``json``, or ``xgb``, which XGBoost 3 writes as UBJSON).
  JSON text is kept as it is; anything else is loaded by ``xgboost.Booster`` from its bytes (XGBoost's own
  reader, never a pickle) and written out as JSON in memory (``save_raw('json')``).
The class an MLmodel file names is never imported or built from its name, and its ``data`` path must stay
inside the downloaded folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emm.errors import EMMError

log = logging.getLogger(__name__)
TREE_FLAVORS = ("lightgbm", "xgboost")
BOOSTER = "lightgbm.basic.Booster"
FIX_LGBM = "log the booster itself: mlflow.lightgbm.log_model(model.booster_, ...) (LightGBM's text format, no pickle)"


@dataclass
class TreeArtifact:
    """A logged tree model as its native text: what the pool copies into pool/ and reads."""

    format: str  # lightgbm | xgboost
    text: str
    source: Path  # the file as downloaded (its sha256 is the member's source_sha256)
    note: str  # how the text was obtained, for the log


def is_tree_model(flavors: dict[str, Any]) -> bool:
    """Whether an MLmodel's flavours make it a tree member (and not a PyTorch one)."""
    return "pytorch" not in flavors and any(f in flavors for f in TREE_FLAVORS)


def read_tree_model(folder: Path, flavors: dict[str, Any], name: str, resolved: str, *,
                    trust_pickle: bool) -> TreeArtifact:
    """The native text of the tree model downloaded to ``folder`` (module docstring); EMMError naming the member."""
    fmt = next(f for f in TREE_FLAVORS if f in flavors)
    conf = flavors[fmt] or {}
    where = f"pool model {name!r}: {resolved}"
    data = folder / str(conf.get("data") or "")
    if not data.resolve().is_relative_to(folder.resolve()) or not data.is_file():
        raise EMMError(f"{where}: its MLmodel names the {fmt} model file {conf.get('data')!r}, which is not a file "
                       "inside the model's folder; log the model again with mlflow." + fmt + ".log_model")
    if fmt == "xgboost":
        return _xgboost(data, where)
    if conf.get("model_class", BOOSTER) == BOOSTER:
        return TreeArtifact("lightgbm", _text(data, where, "lightgbm"), data, f"LightGBM text {data.name}")
    return _sklearn_lightgbm(folder, data, conf, name, where, trust_pickle=trust_pickle)


def _text(path: Path, where: str, fmt: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise EMMError(f"{where}: {path.name} is not {fmt}'s text format (it is binary); "
                       + (FIX_LGBM if fmt == "lightgbm" else "log it again with mlflow.xgboost.log_model")) from None


def _xgboost(data: Path, where: str) -> TreeArtifact:
    raw = data.read_bytes()
    if raw[:2] == b'{"':  # XGBoost's JSON (UBJSON starts with `{` and a type marker)
        return TreeArtifact("xgboost", _text(data, where, "xgboost"), data, f"XGBoost JSON {data.name}")
    try:
        import xgboost as xgb
    except ImportError as exc:
        raise EMMError(f"{where} is stored as {data.name} (XGBoost's binary UBJSON); reading it needs the `xgboost` "
                       "package (pip install xgboost), or log the model with model_format='json'") from exc
    try:
        booster = xgb.Booster()
        booster.load_model(bytearray(raw))  # from memory: the format is read from the bytes, not the suffix
        text = bytes(booster.save_raw("json")).decode("utf-8")
    except Exception as exc:  # XGBoostError: the file's own complaint
        raise EMMError(f"{where}: XGBoost cannot read {data.name} ({str(exc).strip().splitlines()[0]}); log the "
                       "model again with mlflow.xgboost.log_model") from exc
    return TreeArtifact("xgboost", text, data, f"XGBoost {data.name}, converted to JSON")


def _sklearn_lightgbm(folder: Path, data: Path, conf: dict[str, Any], name: str, where: str, *,
                      trust_pickle: bool) -> TreeArtifact:
    kind = conf.get("serialization_format") or "cloudpickle"
    what = f"a scikit-learn {conf.get('model_class')} stored as {data.name} ({kind})"
    if not trust_pickle:
        raise EMMError(
            f"{where} is {what}, not a LightGBM booster in its text format. Loading it builds Python objects the "
            "artifact store chose (a pickle runs any code it names; skops builds the types its MLmodel file lists as "
            f"trusted), so EMM loads it only with `trust_pickle: true` on this entry. Better: {FIX_LGBM}")
    import mlflow.lightgbm

    log.warning("pool model %r: loading %s from %s because the entry sets trust_pickle: true (this runs code from "
                "the artifact store); EMM keeps only its booster's LightGBM text", name, what, where)
    try:
        model = mlflow.lightgbm.load_model(str(folder))
        booster = getattr(model, "booster_", model)
        text = booster.model_to_string()
    except Exception as exc:
        raise EMMError(f"{where}: loading {what} failed ({type(exc).__name__}: {exc}); {FIX_LGBM}") from exc
    return TreeArtifact("lightgbm", text, data, f"{what}, its booster_ as LightGBM text")
