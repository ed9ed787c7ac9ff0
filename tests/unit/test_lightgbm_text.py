"""A damaged LightGBM text model is refused by name before LightGBM reads it (emm.models.lightgbm_text).

LightGBM's own reader ends the process on most of these (``terminate called`` when ``tree_sizes=`` does not
match the trees, a segfault on a child index out of range), so the first test reads the damaged files in a
child interpreter: before the check it died there; now it prints EMM's refusal. Valid files (categorical
splits, single-leaf trees, files without ``tree_sizes=``) still read."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from emm.errors import EMMError
from emm.models.tree_files import read_forest

lgb = pytest.importorskip("lightgbm")


@pytest.fixture(scope="module")
def model_text(tmp_path_factory) -> str:
    """A small binary model with numerical, categorical and missing-value splits."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, 4))
    x[:, 1] = rng.integers(0, 20, len(x))
    x[::7, 2] = np.nan
    y = ((x[:, 0] + (x[:, 1] % 3 == 0) + rng.normal(size=len(x))) > 0.5).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7, "num_threads": 1,
                         "min_data_per_group": 5, "cat_smooth": 1}, lgb.Dataset(x, y, categorical_feature=[1]), 6)
    return booster.model_to_string()


def _line(text: str, key: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(key + "="))


def damaged(text: str) -> dict[str, tuple[str, str]]:
    """name -> (damaged text, what the refusal says)."""
    sizes = _line(text, "tree_sizes")
    first = [int(s) for s in sizes.split("=")[1].split()]
    left = _line(text, "left_child")
    children = left.split("=")[1].split()
    unsized = text.replace(sizes + "\n", "")  # so LightGBM would read the trees one by one, up to the bad one

    def children_are(values: list[str]) -> str:
        return unsized.replace(left, "left_child=" + " ".join(values))

    return {
        "sizes-off": (text.replace(sizes, "tree_sizes=" + " ".join(map(str, [first[0] + 9, *first[1:]]))),
                      "tree_sizes= says tree 0 is"),
        "sizes-short": (text.replace(sizes, "tree_sizes=" + " ".join(map(str, first[:-1]))),
                        f"lists {len(first) - 1} trees, but the file holds {len(first)}"),
        "crlf": (text.replace("\n", "\r\n"), "CRLF line endings"),
        "truncated": (text[: len(text) // 2], "no `end of trees` line"),
        "child-out-of-range": (children_are(["40", *children[1:]]),
                               "tree 0 (Tree=0) is damaged: node 0 has child 40: out of range"),
        "child-loops": (children_are(["0", *children[1:]]), "node 0 has child 0: reached twice"),
        "short-array": (children_are(children[:-1]), f"left_child has {len(children) - 1} values, not {len(children)}"),
    }


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from emm.errors import EMMError
    from emm.models.tree_files import read_forest
    for path in sys.argv[1:]:
        try:
            read_forest(Path(path), "lightgbm", "broken-lgbm")
        except EMMError as exc:
            print("REFUSED", str(exc).replace(chr(10), " "), flush=True)
        else:
            print("READ", path, flush=True)
""")


def test_a_damaged_file_is_refused_and_the_process_lives(model_text, tmp_path):
    cases = damaged(model_text)
    paths = []
    for name, (text, _) in cases.items():
        paths.append(tmp_path / f"{name}.txt")
        paths[-1].write_bytes(text.encode())
    run = subprocess.run([sys.executable, "-c", CHILD, *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"the reader died (rc {run.returncode}) after {run.stdout!r}: {run.stderr[-400:]}"
    lines = run.stdout.splitlines()
    assert len(lines) == len(cases)
    for line, path, (name, (_, says)) in zip(lines, paths, cases.items()):
        assert line.startswith(f"REFUSED pool model 'broken-lgbm' ({path})"), (name, line)
        assert says in line, (name, line)


def test_valid_files_still_read(model_text, tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text(model_text)
    forest = read_forest(path, "lightgbm", "ok")
    assert forest.n_trees == 6 and forest.categorical.any()
    sizes = _line(model_text, "tree_sizes")
    path.write_text(model_text.replace(sizes + "\n", ""))  # older files have no tree_sizes: read one by one
    assert read_forest(path, "lightgbm", "ok").n_trees == 6
    rng = np.random.default_rng(1)
    stump = lgb.train({"objective": "binary", "verbose": -1, "min_gain_to_split": 1e9, "num_threads": 1},
                      lgb.Dataset(rng.normal(size=(100, 2)), rng.integers(0, 2, 100)), 2)
    path.write_text(stump.model_to_string())  # single-leaf trees have empty split arrays
    assert read_forest(path, "lightgbm", "stump").n_trees >= 1


def test_a_linear_tree_is_refused_by_name(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 2))
    booster = lgb.train({"objective": "binary", "verbose": -1, "linear_tree": True, "num_threads": 1},
                        lgb.Dataset(x, (x[:, 0] > 0).astype(int)), 2)
    path = tmp_path / "linear.txt"
    path.write_text(booster.model_to_string())
    with pytest.raises(EMMError, match=r"pool model 'lin' \(.*linear\.txt\) is a linear-tree model"):
        read_forest(Path(path), "lightgbm", "lin")
