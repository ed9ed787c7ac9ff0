"""A tree member in an ONNX file as one ``ai.onnx.ml`` ``TreeEnsemble`` node, not as the torch walk traced.

Why: traced, ``TreeModel.walk`` becomes one gather/compare/where step per tree level over every tree, hundreds of
thousands of ONNX nodes for a forest of a thousand trees: slow to export and slow to score. onnxruntime has a native
tree-ensemble kernel; this module writes each member as that node, built from the member's own tensors (the ones the
walk reads), so the file agrees with the walk by construction and needs neither LightGBM nor XGBoost.

Why ``TreeEnsemble`` (``ai.onnx.ml`` opset 5) and not ``TreeEnsembleRegressor`` (opset 3): it takes double input,
double split values and double leaf weights, so the comparisons are the walk's (a float32 input against a float32
threshold, both exact in double) and the leaves are summed in double as the walk sums them; and its
``BRANCH_MEMBER`` mode expresses a LightGBM categorical split as the set of categories that go left. Why not
onnxmltools: it would be one more pinned dependency whose converters read the booster by their own rules, each to
be checked again for the questions ``emm.models.trees`` lists against hummingbird (NaN/default direction, missing
type Zero/None, categorical codes, float32 thresholds); the member's own tensors already answer them, node for
node, and they are what a fused model saves (``TreeModel.layout``), so what is exported is what torch scores.

The walk's rule, reproduced with ordinary ONNX ops before the node, so every node is a plain comparison:
the booster's input ``x`` ``[B, F]`` is laid out in the blocks its nodes read (only the ones some node reads):
- raw (a NaN-aware split): ``x <= t`` goes left, NaN takes the node's default branch
  (``nodes_missing_value_tracks_true``);
- NaN as 0 (LightGBM ``missing_type`` None): ``nan_to_num(x)``, infinities clipped to float32's largest value as
  ``torch.nan_to_num`` does;
- zero as missing (LightGBM ``missing_type`` Zero): the NaN-as-0 copy with ``|v| <= ZERO_THRESHOLD`` made NaN, so
  0 and NaN take the default branch;
- category code (a categorical split): ``trunc`` of ``x`` clamped to ``[-1, MAX_CODE]``, NaN and infinities -1; a
  node's categories (those that go left in its ``cat_table`` row) are a ``BRANCH_MEMBER`` set, and -1 (NaN,
  negative) or a code past the set's widest category are in no set, so go right, as in the walk.
A tree that is a single leaf becomes a node whose two branches are that leaf. The sum plus the member's base margin
is cast to float32, as the walk's float64 total is.

How it joins the rest of the model (``trees_as_inputs``, ``splice_trees``): for ``torch.onnx.export`` each
``TreeModel`` is swapped for a ``TreeSlot`` whose logit is an extra graph input and whose booster input
(``TreeModel.inputs``) an extra graph output; the exported graph is then rewired output -> prepared blocks ->
``TreeEnsemble`` -> input, those temporary inputs and outputs are removed, the nodes sorted, and the model checked.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from emm.errors import EMMError
from emm.models.trees import MAX_CODE, ZERO_THRESHOLD, TreeModel

ML_DOMAIN, ML_OPSET = "ai.onnx.ml", 5
DESCRIPTION = f"onnx-ml TreeEnsemble ({ML_DOMAIN} opset {ML_OPSET})"  # what export.json says of the trees
RAW, NAN0, ZERO, CODE = range(4)  # the blocks a node reads (see the module docstring)
BRANCH_LEQ, BRANCH_MEMBER = 0, 6  # TreeEnsemble's nodes_modes
LOGIT, INPUT = "emm_tree_logit_{}", "emm_tree_input_{}"  # the temporary graph input and output of member k


# ---- the node ----------------------------------------------------------------------------------------------
def _arrays(tree: TreeModel) -> dict[str, np.ndarray]:
    keys = ("child", "feature", "threshold", "default_right", "zero_missing", "categorical", "cat_lo", "cat_lim",
            "cat_table", "leaf_slot", "roots", "columns")
    return {k: getattr(tree, k).detach().cpu().numpy() for k in keys} | \
        {"value": tree.value.detach().cpu().double().numpy()}


def _blocks(tree: TreeModel, a: dict[str, np.ndarray], internal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each internal node's block and column of the booster input; an EMMError for a node the walk could not
    have been built with (its layout is then not a ``TreeModel``'s)."""
    n_columns = len(a["columns"])
    copy, column = np.divmod(a["feature"], n_columns)
    cat, zero = a["categorical"], a["zero_missing"]
    block = np.where(cat, CODE, np.where(copy == 0, RAW, np.where(zero, ZERO, NAN0)))
    odd = internal & ((cat & (copy != 2)) | (~cat & (copy == 2)) | (~cat & zero & (copy == 0)) | (copy > 2))
    if odd.any():
        raise EMMError(f"tree member {tree.name!r}: node {int(np.argmax(odd))} reads input copy "
                       f"{int(copy[np.argmax(odd)])}, which no TreeModel rule reads; its layout is damaged, fuse again")
    return block, column


def _category_sets(tree: TreeModel, a: dict[str, np.ndarray], nodes: np.ndarray) -> list[np.ndarray]:
    """The categories that go left at each categorical node (its ``cat_table`` row: 0 = left, codes shifted by
    one); an EMMError where a row sends NaN/negative codes or codes past the widest category left, which no
    ``category_table`` writes and a set cannot say."""
    out = []
    for n in nodes:
        lo, lim = int(a["cat_lo"][n]), int(a["cat_lim"][n])
        row = a["cat_table"][lo:lo + lim + 1]
        if len(row) != lim + 1 or row[0] == 0 or row[-1] == 0:
            raise EMMError(f"tree member {tree.name!r}: categorical node {int(n)} sends NaN, negative or unlisted "
                           "codes left, which a TreeEnsemble set cannot express; fuse again from its native file")
        out.append(np.flatnonzero(row[1:lim] == 0).astype(np.float64))
    return out


def ensemble_attributes(tree: TreeModel) -> tuple[list[int], dict[str, Any]]:
    """The blocks the member reads (in their order in the prepared input) and its ``TreeEnsemble`` attributes."""
    from onnx import numpy_helper

    a = _arrays(tree)
    child = a["child"]
    n_nodes, n_columns = len(child), len(a["columns"])
    is_leaf = child == np.arange(n_nodes)
    root_leaf = np.zeros(n_nodes, bool)
    root_leaf[a["roots"][is_leaf[a["roots"]]]] = True
    kept = ~is_leaf | root_leaf  # a single-leaf tree: a node whose two branches are its leaf
    node_id = np.cumsum(kept) - 1
    block, column = _blocks(tree, a, ~is_leaf)
    block = np.where(root_leaf, RAW, block)
    column = np.where(root_leaf, 0, column)
    used = sorted(set(block[kept].tolist()))
    position = {b: i for i, b in enumerate(used)}
    featureid = np.array([position[b] for b in block[kept]], np.int64) * n_columns + column[kept]

    idx = np.flatnonzero(kept)
    left = np.where(root_leaf[idx], idx, child[idx])
    right = np.where(root_leaf[idx], idx, child[idx] + 1)

    def target(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # a leaf by its slot in leaf_weights
        return np.where(is_leaf[c], a["leaf_slot"][c], node_id[c]), is_leaf[c].astype(np.int64)

    true_ids, true_leaf = target(left)
    false_ids, false_leaf = target(right)

    cat = a["categorical"][idx] & ~root_leaf[idx]
    sets = _category_sets(tree, a, idx[cat])
    member = np.zeros(len(idx), bool)
    member[np.flatnonzero(cat)] = [len(s) > 0 for s in sets]
    # a categorical node listing no category sends every code right: code <= -inf never holds
    splits = np.where(cat, -np.inf, a["threshold"][idx].astype(np.float64))
    splits = np.where(member, np.nan, np.where(root_leaf[idx], 0.0, splits))
    modes = np.where(member, BRANCH_MEMBER, BRANCH_LEQ).astype(np.uint8)
    tracks_true = np.where(cat | root_leaf[idx], 0, 1 - a["default_right"][idx].astype(np.int64))
    listed = [s for s in sets if len(s)]
    membership = np.concatenate([np.append(s, np.nan) for s in listed])[:-1] if listed else None
    attrs: dict[str, Any] = {
        "n_targets": 1, "aggregate_function": 1, "post_transform": 0,  # SUM, NONE: the margin itself
        "tree_roots": node_id[a["roots"]].tolist(),
        "nodes_featureids": featureid.tolist(), "nodes_modes": numpy_helper.from_array(modes),
        "nodes_splits": numpy_helper.from_array(splits.astype(np.float64)),
        "nodes_truenodeids": true_ids.tolist(), "nodes_trueleafs": true_leaf.tolist(),
        "nodes_falsenodeids": false_ids.tolist(), "nodes_falseleafs": false_leaf.tolist(),
        "nodes_missing_value_tracks_true": tracks_true.tolist(),
        "leaf_targetids": [0] * len(a["value"]), "leaf_weights": numpy_helper.from_array(a["value"]),
    }
    if membership is not None:
        attrs["membership_values"] = numpy_helper.from_array(membership.astype(np.float64))
    return used, attrs


def ensemble_nodes(tree: TreeModel, x: str, out: str, prefix: str) -> list[Any]:
    """ONNX nodes from the booster input ``x`` (float ``[B, F]``, ``TreeModel.inputs``) to the member's logit ``out``
    (float32 ``[B, 1]``): the prepared blocks, the ``TreeEnsemble``, the base margin, the cast."""
    from onnx import TensorProto, helper, numpy_helper

    used, attrs = ensemble_attributes(tree)
    nodes: list[Any] = []

    def op(kind: str, inputs: list[str], **kw: Any) -> str:
        name = f"{prefix}{len(nodes)}"
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **kw))
        return name

    def const(value: float, dtype: Any = np.float32) -> str:
        return op("Constant", [], value=numpy_helper.from_array(np.array(value, dtype)))

    v = op("Cast", [x], to=TensorProto.FLOAT)
    nan = op("IsNaN", [v])
    biggest = float(np.finfo(np.float32).max)
    blocks: dict[int, str] = {RAW: v}
    if NAN0 in used or ZERO in used:  # torch.nan_to_num(x, nan=0): infinities become float32's extremes
        blocks[NAN0] = op("Clip", [op("Where", [nan, const(0.0), v]), const(-biggest), const(biggest)])
    if ZERO in used:
        small = op("LessOrEqual", [op("Abs", [blocks[NAN0]]), const(ZERO_THRESHOLD)])
        blocks[ZERO] = op("Where", [small, const(np.nan), blocks[NAN0]])
    if CODE in used:  # trunc(clamp(x, -1, MAX_CODE)), NaN and infinities -1: ceil below 0, floor above
        bad = op("Or", [nan, op("IsInf", [v])])
        c = op("Clip", [op("Where", [bad, const(-1.0), v]), const(-1.0), const(MAX_CODE)])
        blocks[CODE] = op("Where", [op("Less", [c, const(0.0)]), op("Ceil", [c]), op("Floor", [c])])
    prepared = [op("Cast", [blocks[b]], to=TensorProto.DOUBLE) for b in used]
    wide = op("Concat", prepared, axis=1) if len(prepared) > 1 else prepared[0]
    name = f"{prefix}ensemble"
    nodes.append(helper.make_node("TreeEnsemble", [wide], [name], name=name, domain=ML_DOMAIN, **attrs))
    total = op("Add", [name, const(float(tree.base), np.float64)])
    nodes.append(helper.make_node("Cast", [total], [out], name=f"{prefix}logit", to=TensorProto.FLOAT))
    return nodes


# ---- joining the exported model ----------------------------------------------------------------------------
class TreeSlot(nn.Module):
    """Where a ``TreeModel`` sat during export: it hands its booster input out and takes its logit in, through the
    lists it shares with ``TreesAsInputs`` (plain lists, not module attributes: nothing the exporter sees mutate)."""

    def __init__(self, tree: TreeModel, index: int, given: list[Tensor], taken: dict[int, Tensor]) -> None:
        super().__init__()
        self.tree, self.index, self.given, self.taken = tree, index, given, taken

    def forward(self, sparse: Tensor, dense: Tensor) -> Tensor:
        if self.index in self.taken:
            raise EMMError(f"tree member {self.tree.name!r} is called twice in one forward; EMM exports a tree "
                           "member that scores each batch once")
        self.taken[self.index] = self.tree.inputs(sparse, dense)
        return self.given[self.index]


class TreesAsInputs(nn.Module):
    """``(sparse, dense, logit_0, ..) -> (logits, input_0, ..)``: the model with its trees as ``TreeSlot``s."""

    def __init__(self, model: nn.Module, trees: list[TreeModel]) -> None:
        super().__init__()
        self.model, self.trees = model, trees
        self.given: list[Tensor] = []
        self.taken: dict[int, Tensor] = {}

    def forward(self, sparse: Tensor, dense: Tensor, *logits: Tensor) -> tuple[Tensor, ...]:
        self.given[:] = list(logits)
        self.taken.clear()
        out = self.model(sparse, dense)
        unused = [t.name for k, t in enumerate(self.trees) if k not in self.taken]
        if unused:
            raise EMMError(f"tree member(s) {unused} are not called by the model's forward; nothing to export")
        return (out, *(self.taken[k] for k in range(len(self.trees))))

    def names(self) -> tuple[list[str], list[str]]:
        """The extra graph inputs (logits) and outputs (booster inputs), member by member."""
        return [LOGIT.format(k) for k in range(len(self.trees))], [INPUT.format(k) for k in range(len(self.trees))]

    def example(self, rows: int) -> tuple[Tensor, ...]:
        """Example logits for the export (float32 ``[rows, 1]``, what a member returns in a float32 model)."""
        return tuple(torch.zeros(rows, 1) for _ in self.trees)


@contextmanager
def trees_as_inputs(model: nn.Module) -> Iterator[TreesAsInputs | None]:
    """``model`` with every ``TreeModel`` swapped for a ``TreeSlot`` (None when it has none), put back on exit."""
    found = [(parent, key, m) for parent in model.modules() for key, m in parent.named_children()
             if isinstance(m, TreeModel)]
    if not found:
        yield None
        return
    wrapper = TreesAsInputs(model, [m for _, _, m in found])
    for k, (parent, key, tree) in enumerate(found):
        setattr(parent, key, TreeSlot(tree, k, wrapper.given, wrapper.taken))
    try:
        yield wrapper
    finally:
        for parent, key, tree in found:
            setattr(parent, key, tree)


def splice_trees(proto: Any, wrapper: TreesAsInputs) -> None:
    """Rewire the exported ``proto`` in place: each member's booster input -> its ``TreeEnsemble`` -> its logit
    input, the temporary inputs and outputs removed, the nodes sorted, the ML opset imported."""
    from onnx import helper

    logits, inputs = wrapper.names()
    graph = proto.graph
    present = {i.name for i in graph.input}
    missing = [n for n in logits if n not in present] + \
        [n for n in inputs if n not in {o.name for o in graph.output}]
    if missing:
        raise EMMError(f"the exported graph lacks {missing}: the exporter renamed the tree members' slots")
    for k, tree in enumerate(wrapper.trees):
        graph.node.extend(ensemble_nodes(tree, inputs[k], logits[k], f"emm_tree{k}_"))
    keep_in = [i for i in graph.input if i.name not in set(logits)]
    keep_out = [o for o in graph.output if o.name not in set(inputs)]
    del graph.input[:]
    graph.input.extend(keep_in)
    del graph.output[:]
    graph.output.extend(keep_out)
    ordered = topological(list(graph.node), {i.name for i in graph.input} | {t.name for t in graph.initializer})
    del graph.node[:]
    graph.node.extend(ordered)
    for o in proto.opset_import:
        if o.domain == ML_DOMAIN:
            if o.version < ML_OPSET:
                o.version = ML_OPSET
            break
    else:
        proto.opset_import.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))


def topological(nodes: list[Any], available: set[str]) -> list[Any]:
    """``nodes`` in an order where each comes after the producers of its inputs (ONNX requires it); a node whose
    subgraph reads an outer value counts that value as an input."""
    def needs(node: Any) -> set[str]:
        out = {n for n in node.input if n}
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                inner = {o for n in g.node for o in n.output} | {i.name for i in g.input} | \
                    {t.name for t in g.initializer}
                out |= {n for sub in g.node for n in needs(sub)} - inner
        return out

    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [{producer[v] for v in needs(n) if v in producer and v not in available} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, deps in enumerate(waiting):
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, deps in enumerate(waiting) if not deps]  # a heap: the exporter's order where it holds
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u].discard(i)
            if not waiting[u]:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise EMMError("the exported graph has a cycle after the tree members were spliced in; please report it")
    return [nodes[i] for i in order]
