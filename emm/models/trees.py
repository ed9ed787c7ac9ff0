"""Gradient-boosted trees (LightGBM, XGBoost) as pool members: a frozen torch module read from the native file.

Why a torch module: a tree member cannot be decomposed, so it joins the fused model at the output, as one more
frozen donor whose logit enters its task's blend. As an ``nn.Module`` taking EMM's ``(sparse, dense)`` it is
scored like every member (AUCs, the stack, the fused model's forward, any device), its state is tensors in
its state dict (the node arrays as buffers, the leaf values as a frozen parameter: nothing to train) and it
is built from the library's own text file, never from a pickle (``emm.models.tree_files``).

Why not hummingbird-ml, the library that converts trees to torch: its LightGBM and XGBoost converters drop
each node's missing-value rule (``default_left``, ``missing_type``), so a NaN goes the wrong way wherever
the library sends it left; its LightGBM converter fails on categorical splits (EMM's own LightGBM gives
every sparse feature as categorical); its thresholds are float32 roundings of LightGBM's doubles; and it
pins ``onnx<=1.16.1``, which the pinned stack (the ONNX export) cannot install. The traversal here is
the libraries' own decision rule, node for node (``emm.models.tree_files``): margins equal the library's raw
predictions up to float32 summation.

The input: the columns the booster was trained on, by name, in its order, gathered from EMM's batch:
a sparse feature as its *local* index (``sparse[:, j] - offset_j``, 0 = unseen: the ingested Parquet's
integer column), a dense feature as its scaled float (the Parquet's float column). So a model trained on
``pandas.read_parquet(data_dir / "train.parquet")[columns]`` reads exactly what EMM feeds it. A file with
no feature names (trained on a bare matrix) is read positionally over all of the schema's features, sparse
then dense, in ``schema.json`` order, and only when its column count is exactly that.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from emm.data.schema import Schema
from emm.errors import EMMError
from emm.io import pinned_sha256, sha256_file
from emm.models.names import MemberName
from emm.models.tree_native import NativeScorer, native_logits
from emm.models.tree_files import FORMATS, MISSING_NAN, MISSING_ZERO, Forest, read_forest

log = logging.getLogger(__name__)
TREE_SUFFIX = {"lightgbm": ".txt", "xgboost": ".json"}  # the native file's suffix in pool/ and pool-work/
ZERO_THRESHOLD = 1e-35  # LightGBM's kZeroThreshold: |x| <= this is "zero" for missing_type Zero
MAX_CODE = float(2**30)  # larger values cannot be categories (LightGBM casts to int); clamped before the cast
MAX_TABLE = 2**26  # entries of the categorical table (one byte each)
TOLERANCE = 1e-4  # relative: our logits vs the library's own, float32 sums of hundreds of leaves
# a TreeModel's plain attributes that ``layout`` records (its tensors are its state dict)
LAYOUT_SCALARS = ("name", "format", "features", "named", "reads", "leaves", "base", "has_categorical",
                  "has_zero_missing", "sigmoid")
LAYOUT_DTYPES = ("int64", "float32", "float64", "uint8", "bool")


class LightGBMSpec(BaseModel):
    """A built-in tree member ``{name, task, arch: lightgbm, ...}``: one LightGBM model trained by ``emm pretrain``
    on the task's labelled train rows, early-stopped on its labelled validation rows.

    Why most settings default to None: None is EMM's LightGBM baseline value (``emm.train.lightgbm_row``, one
    place for those numbers); the pipeline records the resolved settings in the member's signature, so a
    changed baseline retrains it."""

    model_config = ConfigDict(extra="forbid")

    name: MemberName
    task: str
    arch: Literal["lightgbm"]
    rounds: int = Field(default=2000, ge=1, description="boosting rounds at most")
    early_stop: int = Field(default=50, ge=1, description="stop after this many rounds without a better val AUC")
    learning_rate: float | None = Field(default=None, gt=0)
    num_leaves: int | None = Field(default=None, ge=2)
    min_data_in_leaf: int | None = Field(default=None, ge=1)
    feature_fraction: float | None = Field(default=None, gt=0, le=1)
    bagging_fraction: float | None = Field(default=None, gt=0, le=1)
    bagging_freq: int | None = Field(default=None, ge=0)
    lambda_l2: float | None = Field(default=None, ge=0)
    categorical: bool = Field(default=True, description="give sparse features as categorical (else as numbers)")

    @property
    def format(self) -> str:
        return "lightgbm"

    def overrides(self) -> dict[str, float | int]:
        """The LightGBM parameters this entry sets (the others keep the baseline's values)."""
        keys = ("learning_rate", "num_leaves", "min_data_in_leaf", "feature_fraction", "bagging_fraction",
                "bagging_freq", "lambda_l2")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class TreeSpec(BaseModel):
    """What pool.json records for a tree member imported from a file: its format and what it reads."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["tree"] = "tree"
    name: str
    task: str
    format: Literal["lightgbm", "xgboost"]
    features: list[str] = Field(description="the schema features it reads, in its column order")
    trees: int
    leaves: int


class TreeFileMember(BaseModel):
    """A LightGBM or XGBoost model from its native file (text / JSON, never a pickle): ``emm.models.trees``."""

    model_config = ConfigDict(extra="forbid")

    name: MemberName
    task: str
    lightgbm: Path | None = Field(default=None, description="a LightGBM text model (booster.save_model('m.txt'))")
    xgboost: Path | None = Field(default=None, description="an XGBoost JSON model (booster.save_model('m.json'))")
    sha256: str | None = Field(
        default=None, description="pin the file: one with other bytes is refused (EMM fills it in when unset)")

    @property
    def format(self) -> str:
        return "lightgbm" if self.lightgbm is not None else "xgboost"

    @property
    def path(self) -> Path:
        return Path(self.lightgbm if self.lightgbm is not None else self.xgboost)  # type: ignore[arg-type]


def pin_tree_file(member: TreeFileMember) -> TreeFileMember:
    """The entry with ``sha256`` filled in (checked against the file when the user pinned it)."""
    sha = pinned_sha256(member.path, member.sha256, owner=f"pool model {member.name!r}", key=member.format,
                        pin_key="sha256")
    return member.model_copy(update={"sha256": sha})


def is_tree_spec(spec: object) -> bool:
    """Whether a pool entry's spec is a tree member's (they join the fused model at the output)."""
    return isinstance(spec, (LightGBMSpec, TreeSpec))


class TreeModel(nn.Module):
    """A frozen boosted forest: ``(sparse, dense) -> logit [B, 1]`` (the margin, not the probability).

    Every row walks every tree at once, one step a level: read the node's feature, decide, move to the left
    child or the one beside it. The node's rule is the library's (``emm.models.tree_files``), prepared so a
    step costs few tensor operations: the input is laid out three times, ``[raw | NaN as 0 | category
    code + 1]``, and each node reads the copy its rule needs (a NaN-aware split, one where LightGBM reads NaN
    as 0, a categorical split); a categorical node's set is a row of ``cat_table`` (1 = goes right) over
    codes ``-1 (NaN, negative), 0 .. w-1, >= w``. Trees are walked shallowest first and each leaves the walk
    once at its leaf (``schedule``), so the cost follows the trees' own depths, not the deepest one's.
    The reached leaves' values (``value``, one per leaf) are summed in float64, plus the base margin.
    """

    def __init__(self, forest: Forest, schema: Schema, name: str = "tree") -> None:
        super().__init__()
        columns = tree_columns(forest, schema, name)
        self.name, self.format = name, forest.format
        self.features, self.named, self.leaves = list(forest.features), forest.named, forest.leaves
        names = [f.name for f in schema.sparse] + [f.name for f in schema.dense]
        self.reads = [names[c] for c in columns]  # the schema features behind its columns (named or not)
        self.base = float(forest.base)
        self.has_categorical = bool(forest.categorical.any())
        self.has_zero_missing = bool((forest.missing == MISSING_ZERO).any())
        n_features = len(columns)
        depths = forest.tree_depths()
        order = np.argsort(depths, kind="stable")
        self.schedule = walk_schedule(depths[order])
        feature = forest.feature + n_features * np.where(forest.missing == MISSING_NAN, 0, 1)
        feature = np.where(forest.categorical, forest.feature + 2 * n_features, feature)
        lo, lim, table = category_table(forest, name)
        tensors = {
            "offsets": torch.tensor([f.offset for f in schema.sparse], dtype=torch.long),
            "columns": torch.tensor(columns, dtype=torch.long),
            "roots": torch.from_numpy(forest.roots[order]), "child": torch.from_numpy(forest.child),
            "feature": torch.from_numpy(feature.astype(np.int64)), "threshold": torch.from_numpy(forest.threshold),
            "default_right": torch.from_numpy((~forest.default_left).astype(np.uint8)),
            "zero_missing": torch.from_numpy(forest.missing == MISSING_ZERO),
            "categorical": torch.from_numpy(forest.categorical), "cat_lo": torch.from_numpy(lo),
            "cat_lim": torch.from_numpy(lim), "cat_table": torch.from_numpy(table.astype(np.uint8)),
        }
        for key, t in tensors.items():
            self.register_buffer(key, t.clone())
        leaf = forest.child == np.arange(forest.n_nodes)
        self.register_buffer("leaf_slot", torch.from_numpy(np.cumsum(leaf) - 1))  # node -> its leaf's index
        # the fitted leaf values, a frozen parameter: the model's one float state (and the tensor whose device
        # and dtype callers read, as for any member: next(model.parameters()))
        self.value = nn.Parameter(torch.from_numpy(forest.value[leaf].copy()), requires_grad=False)
        self.sigmoid = forest.sigmoid
        self.native: NativeScorer | None = None  # the library's booster, when built from a file (load_tree)

    def layout(self) -> dict[str, Any]:
        """What ``from_layout`` rebuilds this module's shell from: its scalars, its walk and its tensors' shapes and
        dtypes (JSON; the tensors themselves are its state dict).

        Why: a fused model with a tree member is saved as its state dict (the tree's tensors included) and a JSON
        architecture; rebuilt from those alone, it scores with torch and no LightGBM/XGBoost installed, as the
        registered bundle must (``emm.fusion.saved``)."""
        return {**{k: getattr(self, k) for k in LAYOUT_SCALARS}, "schedule": [list(s) for s in self.schedule],
                "tensors": {k: [list(t.shape), str(t.dtype).removeprefix("torch.")]
                            for k, t in self.state_dict().items()}}

    @classmethod
    def from_layout(cls, layout: dict[str, Any]) -> TreeModel:
        """An empty module of ``layout``'s shape (``layout()``), in eval mode: load its state dict to score."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        try:
            for key in LAYOUT_SCALARS:
                setattr(model, key, layout[key])
            model.schedule = [(int(steps), int(done)) for steps, done in layout["schedule"]]
            model.native = None  # attached from the native file by whoever checks it (emm.fusion.saved)
            for key, (shape, dtype) in layout["tensors"].items():
                if dtype not in LAYOUT_DTYPES:
                    raise ValueError(f"tensor {key!r} has dtype {dtype!r}")
                empty = torch.zeros([int(d) for d in shape], dtype=getattr(torch, dtype))
                if key == "value":
                    model.value = nn.Parameter(empty, requires_grad=False)
                else:
                    model.register_buffer(key, empty)
        except (KeyError, TypeError, ValueError) as exc:
            raise EMMError(f"tree model {layout.get('name')!r}: its recorded layout is invalid ({exc!r}); fuse "
                           "again") from exc
        return model.eval()

    @property
    def n_trees(self) -> int:
        return int(self.roots.numel())

    @property
    def depth(self) -> int:
        return sum(steps for steps, _ in self.schedule)

    def inputs(self, sparse: Tensor, dense: Tensor) -> Tensor:
        """The booster's input matrix ``[B, F]`` in its column order (codes as floats: exact below 2**24)."""
        local = (sparse - self.offsets).to(dense.dtype)
        return torch.cat([local, dense], dim=1).index_select(1, self.columns)

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        x = self.inputs(sparse, dense)
        fast = native_logits(self.native, x, self.sigmoid, dense.dtype, sparse, dense)
        if fast is not None:  # the library's own predictor (emm.models.tree_native): same margins, faster
            return fast
        return self.walk(x).to(dense.dtype)

    def walk(self, x: Tensor) -> Tensor:
        """The logits ``[B, 1]`` (float64) of the booster's input matrix ``x`` by walking the trees in torch: the
        definition the library's own predictions are checked against (``check_tree``), and the rule the ONNX export's
        TreeEnsemble nodes are built to (``emm.models.tree_onnx``)."""
        code = torch.nan_to_num(x, nan=-1.0, posinf=-1.0, neginf=-1.0).clamp(-1.0, MAX_CODE).trunc() + 1
        x = torch.cat([x, torch.nan_to_num(x, nan=0.0), code], dim=1)
        node = self.roots + torch.zeros_like(x[:, :1], dtype=torch.long)  # [B, T], shape-free for torch.fx
        total = torch.zeros_like(x[:, 0], dtype=self.value.dtype)
        for steps, finished in self.schedule:
            for _ in range(steps):
                node = self.child[node] + self.goes_right(x.gather(1, self.feature[node]), node)
            total = total + self.value[self.leaf_slot[node[:, :finished]]].sum(dim=1)
            node = node[:, finished:]
        return (total + self.base).unsqueeze(1)

    def goes_right(self, v: Tensor, node: Tensor) -> Tensor:
        """Each (row, tree)'s decision at its current node, ``v`` the node's input (see the class docstring)."""
        missing = torch.isnan(v)  # only a NaN-aware split reads the copy that still has NaN
        if self.has_zero_missing:
            missing = missing | (self.zero_missing[node] & (v.abs() <= ZERO_THRESHOLD))
        # uint8, not bool, for the branch taken: ONNX Runtime has no Where over bools (`emm export`)
        right = torch.where(missing, self.default_right[node], (v > self.threshold[node]).to(torch.uint8))
        if self.has_categorical:
            code = v.nan_to_num(0.0).clamp(0.0, MAX_CODE + 1).long()  # other nodes' values: any float
            at = self.cat_lo[node] + torch.minimum(code, self.cat_lim[node])
            right = torch.where(self.categorical[node], self.cat_table[at], right)
        return right


def walk_schedule(depths: np.ndarray) -> list[tuple[int, int]]:
    """``(steps, trees done)`` pairs for trees sorted by depth: walk ``steps`` more levels, then the next
    ``trees done`` trees are at their leaves and leave the walk."""
    out, walked = [], 0
    for d in sorted(set(int(x) for x in depths)):
        out.append((d - walked, int((depths == d).sum())))
        walked = d
    return out


def category_table(forest: Forest, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per node the start of its row in one flat "goes right" table and its last index (``w + 1``, codes
    shifted by one: 0 = NaN/negative, ``w + 1`` = at or above the largest listed category + 1)."""
    n = forest.n_nodes
    lo, lim = np.zeros(n, np.int64), np.zeros(n, np.int64)
    nodes = np.flatnonzero(forest.categorical)
    widths = [int(forest.cat_values[forest.cat_start[i]:forest.cat_start[i] + forest.cat_len[i]].max(initial=-1)) + 1
              for i in nodes]
    size = 1 + sum(w + 2 for w in widths)
    if size > MAX_TABLE:
        raise EMMError(f"pool model {name!r}: its categorical splits list categories up to {max(widths) - 1}, "
                       f"{size:,} table entries in all (EMM scores up to {MAX_TABLE:,}); lower LightGBM's "
                       "max_cat_threshold or give the widest features as numbers")
    table = np.ones(size, bool)
    at = 1
    for i, w in zip(nodes, widths):
        lo[i], lim[i] = at, w + 1
        listed = forest.cat_values[forest.cat_start[i]:forest.cat_start[i] + forest.cat_len[i]]
        table[at + 1 + listed] = False  # listed categories go left
        at += w + 2
    return lo, lim, table


def tree_columns(forest: Forest, schema: Schema, name: str) -> list[int]:
    """Where each of the booster's columns sits in ``[local sparse codes | dense]`` (schema order).

    Refused, naming the member: a name that is no feature of the schema (a task's label above all: the model
    would read the answer), a repeated name, and an unnamed model whose column count is not the schema's."""
    order = [f.name for f in schema.sparse] + [f.name for f in schema.dense]
    if not forest.named:
        if len(forest.features) != len(order):
            raise EMMError(f"pool model {name!r} has {len(forest.features)} unnamed feature columns, but "
                           f"{schema.dataset!r} gives a tree model {len(order)} ({schema.n_sparse} sparse codes, then "
                           f"{schema.n_dense} dense values, in schema.json order): it was trained on other columns. "
                           "Train it on the ingested Parquet's feature columns, as a DataFrame so the file records "
                           "their names")
        log.warning("pool model %r records no feature names: EMM reads its %d columns as the schema's features in "
                    "schema.json order (sparse, then dense); train it on a DataFrame so the names are checked",
                    name, len(order))
        return list(range(len(order)))
    position = {n: i for i, n in enumerate(order)}
    tasks = set(schema.task_names)
    unknown = [n for n in forest.features if n not in position]
    if unknown:
        labels = [n for n in unknown if n in tasks]
        why = (f"; {labels} are task labels, so the model would read the answer" if labels else "")
        raise EMMError(f"pool model {name!r} reads feature(s) {unknown[:6]}{' ...' if len(unknown) > 6 else ''} "
                       f"that {schema.dataset!r} does not have{why} (its {len(forest.features)} columns vs the "
                       f"schema's {len(order)} features {order[:4]}...); train it on the ingested Parquet's feature "
                       "columns only")
    repeated = sorted({n for n in forest.features if forest.features.count(n) > 1})
    if repeated:
        raise EMMError(f"pool model {name!r} names feature(s) {repeated} more than once")
    return [position[n] for n in forest.features]


def load_tree(path: Path, fmt: str, schema: Schema, name: str, *, sha256: str | None = None) -> TreeModel:
    """The tree member in ``path`` as a frozen ``TreeModel`` (eval mode), the file's sha256 checked first
    when given (pool.json records it: a file replaced since is refused, not scored under this name)."""
    if fmt not in FORMATS:
        raise EMMError(f"pool model {name!r}: tree format {fmt!r} is not one of {list(FORMATS)}")
    if sha256 is not None:
        found = sha256_file(Path(path))
        if found != sha256:
            raise EMMError(f"pool model {name!r}: {path} has sha256 {found}, not the recorded {sha256}: the file "
                           "changed since it was recorded; rerun `emm pretrain`")
    forest = read_forest(Path(path), fmt, name)
    model = TreeModel(forest, schema, name).eval()
    model.native = NativeScorer.from_file(Path(path), fmt, list(forest.features) if forest.named else None)
    return model


@torch.no_grad()
def check_tree(model: TreeModel, path: Path, sparse: Tensor, dense: Tensor) -> None:
    """Run the member on real rows and hold its logits against the library's own predictions of the same rows
    (``sigmoid`` x raw score): a file feature EMM reads wrongly must fail here, not score quietly."""
    out = model.walk(model.inputs(sparse, dense)).to(dense.dtype)  # the walk itself, never the library's path
    if tuple(out.shape) != (sparse.shape[0], 1) or not torch.isfinite(out).all():
        raise EMMError(f"pool model {model.name!r}: {path} gave {list(out.shape)} logits, "
                       f"{int((~torch.isfinite(out)).sum())} not finite, for {sparse.shape[0]} validation rows")
    x = model.inputs(sparse, dense).double().numpy()
    scorer = model.native or NativeScorer.from_file(Path(path), model.format, model.features if model.named else None)
    if not scorer.available:  # XGBoost is optional: its JSON is read without it
        log.info("pool model %r: %s is not installed, so its logits were not compared with its own",
                 model.name, model.format)
        return
    raw = np.asarray(scorer.margins(x), dtype=np.float64).reshape(-1)
    ours, theirs = out[:, 0].double().numpy(), raw * model.sigmoid
    off = np.abs(ours - theirs) > TOLERANCE * np.maximum(1.0, np.abs(theirs))
    if off.any():
        i = int(np.argmax(np.abs(ours - theirs)))
        raise EMMError(f"pool model {model.name!r}: EMM's reading of {path} disagrees with {model.format}'s own "
                       f"predictions on {int(off.sum())} of {len(ours)} validation rows (e.g. logit {ours[i]:.6g} vs "
                       f"{theirs[i]:.6g}): the file uses something EMM does not score. Please report it with the "
                       "file; meanwhile leave the member out")
