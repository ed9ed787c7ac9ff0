"""Checking a LightGBM text model's structure before LightGBM reads it.

Why: LightGBM's reader trusts the file. The header's ``tree_sizes=`` gives each tree's length in bytes and the
trees are then parsed in parallel at those offsets, so a file whose sizes no longer match its trees (edited by
hand, truncated, its line endings turned to CRLF by git's ``core.autocrlf``) makes LightGBM raise inside a
parallel region, and that ends the whole process (``terminate called``), not in an exception EMM could
report. Inside a tree its arrays are read without a length check and its child indices followed as given, so
a short array or a child out of range reads past the end (a segfault) and a child that points back up never
ends. So the text is checked here first, in Python, against everything the reader takes for granted, and
only a file that passes reaches LightGBM; what fails is refused naming the member, the file, the tree and
the field.

The rules are those of LightGBM's own writer (``GBDT::SaveModelToString``, ``Tree::ToString``): a header of
``key=value`` lines, then one block per tree (a ``Tree=<i>`` line, ``key=value`` lines, a blank line), then
``end of trees``; ``tree_sizes`` is the distance in bytes from each ``Tree=`` line to the next one (to ``end of
trees`` for the last); a tree with ``num_leaves`` n has ``n - 1`` split nodes whose children are split
nodes ``0 .. n-2`` or leaves ``~0 .. ~(n-1)``, each reached exactly once from node 0.
"""

from __future__ import annotations

import re

from emm.errors import EMMError

SAVE = "booster.save_model('model.txt')"
LINEAR = ("is a linear-tree model (linear_tree=True): its leaves are linear models, which EMM does not score; "
          "train it with linear_tree=False")
TREE_LINE = re.compile(rb"^Tree=", re.M)
END_LINE = re.compile(rb"^end of trees\r?$", re.M)
MAX_TREE_LINES = 22  # LightGBM's tree reader reads at most this many key=value lines of a block
SPLIT_INT = ("left_child", "right_child", "split_feature", "decision_type", "internal_count")  # n - 1 ints
SPLIT_FLOAT = ("threshold", "split_gain", "internal_value", "internal_weight")  # n - 1 numbers
LEAF_INT, LEAF_FLOAT = ("leaf_count",), ("leaf_value", "leaf_weight")  # n each
REQUIRED = ("left_child", "right_child", "split_feature", "threshold")


class Damaged(ValueError):
    """One structural problem, said as ``field: what is wrong``."""


def check_lightgbm_text(text: str, where: str) -> None:
    """Refuse (``EMMError`` starting with ``where``) a LightGBM text model LightGBM's reader would crash on."""
    raw = text.encode("utf-8")  # tree_sizes counts bytes
    crlf = b"\r\n" in raw
    hint = (" It has CRLF line endings, which shift every offset: was it checked out by git with core.autocrlf "
            "(mark *.txt model files `binary` in .gitattributes)?" if crlf else "")
    fix = f"; the file was changed after LightGBM wrote it (edited or cut short).{hint} Write it again with {SAVE}"
    starts = [m.start() for m in TREE_LINE.finditer(raw)]
    end = END_LINE.search(raw, starts[-1] if starts else 0)
    if end is None:
        raise EMMError(f"{where} has no `end of trees` line after its {len(starts)} tree(s): it is truncated{fix}")
    header = _key_values(raw[:starts[0] if starts else end.start()].decode("utf-8").splitlines())
    try:
        max_feature = _int(header, "max_feature_idx", 0)
        if "tree_sizes" in header:
            _check_sizes(header["tree_sizes"], starts, end.start())
    except Damaged as exc:
        raise EMMError(f"{where}: header {exc}{fix}") from None
    bounds = [*starts, end.start()]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        lines = raw[a:b].decode("utf-8").splitlines()
        try:
            if _tree(lines[1:], max_feature):
                raise EMMError(f"{where} {LINEAR}")
        except Damaged as exc:
            raise EMMError(f"{where}: tree {i} ({lines[0].strip()}) is damaged: {exc}{fix}") from None


def _check_sizes(value: str, starts: list[int], end: int) -> None:
    """``tree_sizes`` must put every tree's start on its ``Tree=`` line and the last tree's end on ``end of trees``."""
    try:
        sizes = [int(s) for s in value.split()]
    except ValueError:
        raise Damaged(f"tree_sizes={value[:60]!r} is not a list of byte counts") from None
    if len(sizes) != len(starts):
        raise Damaged(f"tree_sizes= lists {len(sizes)} trees, but the file holds {len(starts)} `Tree=` blocks")
    at = starts[0] if starts else end
    for i, (size, start) in enumerate(zip(sizes, [*starts[1:], end])):
        if at + size != start:
            raise Damaged(f"tree_sizes= says tree {i} is {size} bytes long, but it is {start - at}")
        at = start


def _key_values(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        key, sep, value = line.rstrip("\r").partition("=")
        if sep:
            out[key] = value
    return out


def _tree(lines: list[str], max_feature: int) -> bool:
    """Check one tree block (the lines after ``Tree=``); True when it is a linear tree (refused by the caller)."""
    block = []
    for line in lines:
        if not line.strip():
            break
        if "=" not in line:
            raise Damaged(f"line {line[:60]!r} is not key=value")
        block.append(line)
    fields = _key_values(block[:MAX_TREE_LINES])
    n = _int(fields, "num_leaves", 1)
    n_cat = _int(fields, "num_cat", 0)
    if "leaf_value" not in fields:
        raise Damaged("no leaf_value")
    if _int(fields, "is_linear", 0, required=False):
        return True
    _array(fields, "leaf_value", n, float, required=True)
    if n == 1:  # a single leaf: LightGBM reads nothing else
        return False
    for key in LEAF_INT + LEAF_FLOAT:
        _array(fields, key, n, float if key in LEAF_FLOAT else int, required=key == "leaf_value")
    arrays = {key: _array(fields, key, n - 1, int if key in SPLIT_INT else float, required=key in REQUIRED)
              for key in SPLIT_INT + SPLIT_FLOAT}
    _shape(arrays["left_child"], arrays["right_child"], n)
    bad = [f for f in arrays["split_feature"] if not 0 <= f <= max_feature]
    if bad:
        raise Damaged(f"split_feature {bad[0]} is not a column 0..{max_feature} (max_feature_idx)")
    decision = arrays["decision_type"] or [0] * (n - 1)
    if any(not -128 <= d <= 127 for d in decision):
        raise Damaged("decision_type holds a value outside -128..127")
    categorical = [arrays["threshold"][i] for i, d in enumerate(decision) if d & 1]
    if categorical or n_cat:
        _categories(fields, n_cat, categorical)
    return False


def _shape(left: list[int], right: list[int], n: int) -> None:
    """From split node 0, every split node and every leaf is reached exactly once (no cycle, nothing shared)."""
    seen_split, seen_leaf = [False] * (n - 1), [False] * n
    seen_split[0] = True
    stack = [0]
    while stack:
        node = stack.pop()
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= n - 1 or seen_split[child]:
                    why = "out of range" if child >= n - 1 else "reached twice"
                    raise Damaged(f"node {node} has child {child}: {why}")
                seen_split[child] = True
                stack.append(child)
            else:
                leaf = ~child
                if leaf >= n or seen_leaf[leaf]:
                    raise Damaged(f"node {node} has leaf {leaf}: {'out of range' if leaf >= n else 'reached twice'} "
                                  f"(num_leaves={n})")
                seen_leaf[leaf] = True
    if not all(seen_split) or not all(seen_leaf):
        raise Damaged(f"not every node of its {n} leaves is reached from the root")


def _categories(fields: dict[str, str], n_cat: int, thresholds: list[float]) -> None:
    """A categorical split's threshold indexes ``cat_boundaries``, which slices ``cat_threshold``."""
    if n_cat < 1:
        raise Damaged("a categorical split, but num_cat=0")
    bounds = _array(fields, "cat_boundaries", n_cat + 1, int, required=True)
    if bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise Damaged("cat_boundaries do not rise from 0")
    words = _array(fields, "cat_threshold", bounds[-1], int, required=True)
    if any(not 0 <= w < 2**32 for w in words):
        raise Damaged("cat_threshold holds a value outside uint32")
    bad = [t for t in thresholds if not (0 <= t < n_cat and t == int(t))]  # NaN and inf fail the range first
    if bad:
        raise Damaged(f"a categorical split's threshold {bad[0]} is not a category set 0..{n_cat - 1}")


def _int(fields: dict[str, str], key: str, least: int, *, required: bool = True) -> int:
    if key not in fields:
        if required:
            raise Damaged(f"no {key}")
        return 0
    try:
        value = int(fields[key])
    except ValueError:
        raise Damaged(f"{key}={fields[key][:40]!r} is not an integer") from None
    if value < least:
        raise Damaged(f"{key}={value} is below {least}")
    return value


def _array(fields: dict[str, str], key: str, count: int, kind: type, *, required: bool) -> list:
    if key not in fields:
        if required:
            raise Damaged(f"no {key}")
        return []
    items = fields[key].split()
    if len(items) != count:
        raise Damaged(f"{key} has {len(items)} values, not {count}")
    try:
        return [kind(v) for v in items]
    except ValueError:
        raise Damaged(f"{key} holds a value that is not {'an integer' if kind is int else 'a number'}") from None
