"""Reading a boosted forest from its library's native file: LightGBM's text model, XGBoost's JSON model.

Why native files only: a pickle runs code when it is loaded, and a ``.ubj``/binary dump cannot be read or
diffed; both formats here are plain text the library itself writes (``booster.save_model('model.txt')``,
``booster.save_model('model.json')``) and reads back. A file of another kind is refused with what it
looks like and how to write the right one.

Each reader returns a ``Forest``: every node of every tree as one row of flat arrays, with each split
rewritten to a single rule that holds for any float32 input ``x`` exactly as the library decides it:
- numerical: left when ``x <= t`` with ``t`` a float32. LightGBM compares ``x <= threshold`` in double, so
  ``t`` is the largest float32 not above the threshold; XGBoost compares ``x < c`` in float32, so ``t`` is
  the float32 just below ``c``. For float32 ``x`` both are then the library's own comparison, bit for bit.
- missing: LightGBM's ``missing_type`` (``None``: NaN is read as 0; ``Zero``: 0 and NaN take the default
  branch; ``NaN``: NaN takes it) and XGBoost's NaN-to-default branch, with the node's ``default_left``.
- categorical (LightGBM): left when ``trunc(x)`` is a non-negative category of the node's set; NaN,
  negative and unlisted values go right. XGBoost's categorical splits are refused (see ``read_xgboost``).
Leaves point to themselves and always go "left", so a fixed number of steps (the deepest leaf's depth)
reaches every tree's leaf. Leaf values are scaled so the forest's sum is the task's logit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emm.errors import EMMError
from emm.models.lightgbm_text import LINEAR, check_lightgbm_text

MISSING_NONE, MISSING_ZERO, MISSING_NAN = 0, 1, 2  # LightGBM's missing types, by the same numbers
LIGHTGBM_MISSING = {"None": MISSING_NONE, "Zero": MISSING_ZERO, "NaN": MISSING_NAN}
LIGHTGBM_BINARY = ("binary", "cross_entropy")  # objectives whose raw score is (sigmoid * ) the logit
XGBOOST_LOGISTIC = ("binary:logistic", "reg:logistic")  # base_score is a probability: its logit is the margin
XGBOOST_RAW = ("binary:logitraw",)  # base_score is a margin already
UNNAMED_LIGHTGBM = re.compile(r"Column_\d+")  # LightGBM's names for the columns of a numpy matrix
FORMATS = ("lightgbm", "xgboost")
SAVE = {"lightgbm": "booster.save_model('model.txt') (LightGBM's text format)",
        "xgboost": "booster.save_model('model.json') (XGBoost's JSON format; not .ubj, not pickle/joblib)"}


@dataclass
class Node:
    """One node as the readers collect it (a leaf when ``value`` is set)."""

    value: float | None = None
    feature: int = 0
    threshold: float = math.inf  # float32, go left when x <= threshold
    default_left: bool = True
    missing: int = MISSING_NAN
    categories: list[int] | None = None
    left: int = -1
    right: int = -1


@dataclass
class Forest:
    """A binary classifier's trees as flat node arrays (see the module docstring for the rule per node).

    A categorical node's categories (those that go left) are ``cat_values[cat_start[n]:][:cat_len[n]]``.
    ``child[n]`` is the left child; the right one is ``child[n] + 1`` (children are laid out side by side,
    so one step reads one index); a leaf's ``child`` is itself. ``features``: the model's input columns in
    its order, as the file names them (``named`` False: the library's placeholders for unnamed columns).
    """

    format: str
    features: list[str]
    named: bool
    roots: np.ndarray
    child: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    default_left: np.ndarray
    missing: np.ndarray
    categorical: np.ndarray
    cat_start: np.ndarray
    cat_len: np.ndarray
    cat_values: np.ndarray
    value: np.ndarray
    base: float
    sigmoid: float  # logit per unit of the library's raw score (LightGBM's `sigmoid`; 1 for XGBoost)
    depth: int
    leaves: int
    objective: str = ""

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    @property
    def n_nodes(self) -> int:
        return len(self.child)

    def tree_depths(self) -> np.ndarray:
        """Each tree's deepest leaf (steps from its root)."""
        out = np.zeros(self.n_trees, np.int64)
        for t, root in enumerate(self.roots):
            stack = [(int(root), 0)]
            while stack:
                n, d = stack.pop()
                if self.child[n] == n:
                    out[t] = max(out[t], d)
                else:
                    stack += [(int(self.child[n]), d + 1), (int(self.child[n]) + 1, d + 1)]
        return out


def read_forest(path: Path, fmt: str, name: str) -> Forest:
    """The forest in ``path`` (``fmt``: lightgbm or xgboost); an EMMError naming the member otherwise."""
    if fmt not in FORMATS:
        raise EMMError(f"pool model {name!r}: tree format {fmt!r} is not one of {list(FORMATS)}")
    text = read_text(Path(path), fmt, name)
    return read_lightgbm(text, path, name) if fmt == "lightgbm" else read_xgboost(text, path, name)


def read_text(path: Path, fmt: str, name: str) -> str:
    """The file as text, or a refusal that says what it is instead (a pickle, a binary, another format)."""
    if not path.is_file():
        raise EMMError(f"pool model {name!r}: {fmt} file {path} does not exist (relative paths are read from "
                       f"{Path.cwd()}); write it with {SAVE[fmt]}")
    raw = path.read_bytes()
    what = _binary_kind(raw)
    if what is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            what = "a binary file"
    if what is None:
        starts = text.lstrip()
        if fmt == "lightgbm" and starts.startswith("tree"):
            return text
        if fmt == "xgboost" and starts.startswith("{"):
            return text
        what = "a JSON document" if starts.startswith("{") else "text in another format"
    raise EMMError(f"pool model {name!r}: {path} is {what}, not a {fmt} model in its native format; EMM reads trees "
                   f"only from the library's own text file, never a pickle (loading one runs code). Save it with "
                   f"{SAVE[fmt]}")


def _binary_kind(raw: bytes) -> str | None:
    if raw[:1] == b"\x80" and raw[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (pickle.dump / joblib.dump)"
    if raw[:2] in (b"\x1f\x8b", b"\x78\x9c", b"\x78\x01", b"\x78\xda") or raw[:3] == b"BZh":
        return "a compressed file (a joblib/gzip dump?)"
    if raw[:4] == b"PK\x03\x04":
        return "a zip archive"
    if raw[:1] == b"{" and raw[1:2] in (b"L", b"U", b"i", b"$", b"#", b"d", b"D", b"l", b"I"):
        return "a UBJSON file (XGBoost's .ubj)"
    return None


# ---- LightGBM ----------------------------------------------------------------------------------------------
def read_lightgbm(text: str, path: Path, name: str) -> Forest:
    """A LightGBM text model through LightGBM's own reader (``Booster(model_str=...).dump_model()``), once its
    structure is checked (``emm.models.lightgbm_text``: a damaged file would end the process inside LightGBM)."""
    try:
        import lightgbm as lgb
    except ImportError as exc:
        raise EMMError(f"pool model {name!r}: reading a LightGBM model needs the `lightgbm` package: "
                       "pip install -e '.[baselines]'") from exc
    where = f"pool model {name!r} ({path})"
    check_lightgbm_text(text, where)
    try:
        booster = lgb.Booster(model_str=text)
        dump = booster.dump_model()
    except Exception as exc:  # LightGBMError: the file's own complaint
        raise EMMError(f"{where}: LightGBM cannot read it ({_first_line(exc)}); write it again with "
                       f"{SAVE['lightgbm']}") from exc
    objective = str(dump.get("objective", ""))
    kind = objective.split(" ")[0]
    if kind not in LIGHTGBM_BINARY or int(dump.get("num_tree_per_iteration", 1)) != 1:
        raise EMMError(f"{where} has objective {objective!r} (num_class {dump.get('num_class')}): a pool member "
                       f"scores one binary task, so EMM takes a model trained with objective 'binary' (or "
                       "'cross_entropy'); train one per task")
    if booster.pandas_categorical:
        raise EMMError(f"{where} was trained on pandas 'category' columns: LightGBM recodes those by their "
                       "category lists, which are not EMM's indices. Train it on the ingested integer columns and "
                       "name them in categorical_feature=[...] (emm.train.lightgbm_row.lightgbm_features)")
    sigmoid = float(re.search(r"sigmoid:([0-9.eE+-]+)", objective).group(1)) if "sigmoid:" in objective else 1.0
    trees = dump.get("tree_info", [])
    scale = sigmoid / len(trees) if dump.get("average_output") and trees else sigmoid
    forest_nodes = [_lightgbm_tree(t["tree_structure"], where) for t in trees]
    names = list(dump.get("feature_names", []))
    named = not all(UNNAMED_LIGHTGBM.fullmatch(n) for n in names)
    return build_forest("lightgbm", names, named, forest_nodes, base=0.0, scale=scale, sigmoid=sigmoid,
                        objective=objective)


def _lightgbm_tree(root: dict[str, Any], where: str) -> list[Node]:
    """One tree's nodes, root first, children by index (iterative: a leaf-wise tree can be deep)."""
    nodes: list[Node] = []
    stack: list[tuple[dict[str, Any], int]] = [(root, -1)]
    while stack:
        raw, parent_slot = stack.pop()
        i = len(nodes)
        if parent_slot >= 0:
            parent, side = divmod(parent_slot, 2)
            setattr(nodes[parent], "left" if side == 0 else "right", i)
        if "leaf_value" in raw or "split_feature" not in raw:
            if "leaf_coeff" in raw:
                raise EMMError(f"{where} {LINEAR}")
            nodes.append(Node(value=float(raw.get("leaf_value", 0.0))))
            continue
        node = Node(feature=int(raw["split_feature"]), default_left=bool(raw.get("default_left", False)),
                    missing=LIGHTGBM_MISSING[str(raw.get("missing_type", "None"))])
        if raw.get("decision_type") == "==":
            node.categories = [int(c) for c in str(raw["threshold"]).split("||") if c != ""]
        elif raw.get("decision_type") == "<=":
            node.threshold = float_below(float(raw["threshold"]))
        else:
            raise EMMError(f"{where}: a split with decision type {raw.get('decision_type')!r}, which EMM does not "
                           "know; please report it with the file")
        nodes.append(node)
        stack.append((raw["right_child"], 2 * i + 1))
        stack.append((raw["left_child"], 2 * i))
    return nodes


# ---- XGBoost -----------------------------------------------------------------------------------------------
def read_xgboost(text: str, path: Path, name: str) -> Forest:
    """An XGBoost JSON model, read as JSON (the schema XGBoost documents; the library is not needed)."""
    where = f"pool model {name!r} ({path})"
    try:
        learner = json.loads(text)["learner"]
        booster = learner["gradient_booster"]
        params = learner["learner_model_param"]
        objective = learner["objective"]["name"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EMMError(f"{where} is not an XGBoost JSON model (no {exc} in it); write it with "
                       f"{SAVE['xgboost']}") from exc
    if booster.get("name") != "gbtree":
        raise EMMError(f"{where} uses booster {booster.get('name')!r}; EMM scores 'gbtree' models (dart drops "
                       "trees at random when training, gblinear has none): train with booster='gbtree'")
    if objective not in XGBOOST_LOGISTIC + XGBOOST_RAW or int(params.get("num_class", 0)) > 1 \
            or int(params.get("num_target", 1)) != 1:
        raise EMMError(f"{where} has objective {objective!r} (num_class {params.get('num_class')}, num_target "
                       f"{params.get('num_target', 1)}): a pool member scores one binary task, so EMM takes "
                       "'binary:logistic' (or 'binary:logitraw'); train one per task")
    types = learner.get("feature_types") or []
    trees = booster["model"]["trees"]
    if "c" in types or any(1 in (t.get("split_type") or []) for t in trees):
        raise EMMError(f"{where} has categorical splits (enable_categorical=True), which EMM does not score for "
                       "XGBoost; train it on the ingested integer codes as numbers (no 'category' dtype), or use "
                       "LightGBM, whose categorical splits EMM scores")
    base = float(str(params["base_score"]).strip("[]").split(",")[0])
    if objective in XGBOOST_LOGISTIC:
        base = math.log(base / (1 - base))
    nodes = [_xgboost_tree(t, where) for t in trees]
    names = list(learner.get("feature_names") or [])
    count = int(params.get("num_feature", len(names)))
    named = bool(names)
    return build_forest("xgboost", names if named else [f"f{i}" for i in range(count)], named, nodes, base=base,
                        scale=1.0, sigmoid=1.0, objective=objective)


def _xgboost_tree(tree: dict[str, Any], where: str) -> list[Node]:
    """One tree's reachable nodes in XGBoost's own numbering (deleted ones are never reached)."""
    if int(tree.get("tree_param", {}).get("size_leaf_vector", 1)) > 1:
        raise EMMError(f"{where} has vector leaves (multi-target trees); EMM scores one task per member")
    lefts, rights = tree["left_children"], tree["right_children"]
    conds, feats, defaults = tree["split_conditions"], tree["split_indices"], tree["default_left"]
    nodes = []
    for n in range(len(lefts)):
        if lefts[n] == -1:
            nodes.append(Node(value=float(conds[n])))
        else:  # XGBoost: left when x < c (float32), NaN to the default branch
            below = np.nextafter(np.float32(conds[n]), np.float32(-np.inf), dtype=np.float32)
            nodes.append(Node(feature=int(feats[n]), threshold=float(below), default_left=bool(defaults[n]),
                              missing=MISSING_NAN, left=int(lefts[n]), right=int(rights[n])))
    return nodes


# ---- the flat layout ----------------------------------------------------------------------------------------
def float_below(threshold: float) -> float:
    """The largest float32 not above ``threshold``: ``x <= it`` iff ``x <= threshold`` for every float32 x."""
    with np.errstate(over="ignore"):  # LightGBM writes +-1e300 for "no bound": float32 +-inf, then corrected
        t32 = np.float32(threshold)
    if np.isfinite(threshold) and float(t32) > threshold:
        t32 = np.nextafter(t32, np.float32(-np.inf), dtype=np.float32)
    return float(t32)


def build_forest(fmt: str, features: list[str], named: bool, trees: list[list[Node]], *, base: float,
                 scale: float, sigmoid: float, objective: str) -> Forest:
    """Lay every tree out with each node's two children side by side (see ``Forest``)."""
    child: list[int] = []
    rows: list[Node] = []
    roots, depth, leaves = [], 0, 0
    for nodes in trees:
        roots.append(len(rows))
        rows.append(nodes[0])
        child.append(-1)
        frontier = [(0, roots[-1], 0)]  # (index in the tree, row, depth)
        while frontier:
            i, row, d = frontier.pop()
            node = nodes[i]
            if node.value is not None:
                child[row] = row
                depth, leaves = max(depth, d), leaves + 1
                continue
            child[row] = len(rows)
            for side in (node.left, node.right):
                rows.append(nodes[side])
                child.append(-1)
                frontier.append((side, len(rows) - 1, d + 1))
    cats = [n.categories or [] for n in rows]
    cat_len = np.array([len(c) for c in cats], np.int64)
    cat_start = np.concatenate([[0], np.cumsum(cat_len)[:-1]]).astype(np.int64) if rows else cat_len
    return Forest(
        format=fmt, features=features, named=named, roots=np.array(roots, np.int64), child=np.array(child, np.int64),
        feature=np.array([n.feature for n in rows], np.int64),
        threshold=np.array([n.threshold for n in rows], np.float32),
        default_left=np.array([n.default_left or n.value is not None for n in rows], bool),
        missing=np.array([MISSING_NAN if n.value is not None else n.missing for n in rows], np.int8),
        categorical=np.array([n.categories is not None for n in rows], bool),
        cat_start=cat_start, cat_len=cat_len, cat_values=np.array([c for cs in cats for c in cs], np.int64),
        value=np.array([(n.value or 0.0) * scale for n in rows], np.float64), base=base * scale, sigmoid=sigmoid,
        depth=depth, leaves=leaves, objective=objective)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
