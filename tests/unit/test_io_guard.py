"""The I/O guard: a stage removes or writes only paths that resolve inside its own folder, whatever a name
in params.yaml (or a symlink someone left in the folder) says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emm.errors import EMMError
from emm.io import atomic_dir, inside, remove_tree


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """<tmp>/project/pool-work (the root, holding one member's folder) beside <tmp>/outside (a sentinel)."""
    root = tmp_path / "project" / "pool-work"
    (root / "member").mkdir(parents=True)
    (root / "member" / "weights.bin").write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the stage's")
    return root, outside


def escapes(root: Path, outside: Path) -> list[Path]:
    return [root / ".." / "x", root / "member" / ".." / ".." / "x", outside, root / str(outside),
            root / "..", root.parent]


def test_inside_accepts_paths_below_the_root(layout):
    root, _ = layout
    for path in (root / "member", root / "new" / "deeper", root / "member" / ".." / "other"):
        assert inside(path, root) == path  # returned as given, so records keep the caller's spelling


def test_inside_refuses_paths_that_leave_the_root(layout):
    root, outside = layout
    for path in escapes(root, outside):
        with pytest.raises(EMMError, match=rf"{re.escape(str(path))}.*outside.*{re.escape(str(root))}"):
            inside(path, root)


def test_inside_refuses_the_root_itself(layout):
    root, _ = layout
    for path in (root, root / "", root / ".", root / "member" / ".."):
        with pytest.raises(EMMError, match="is the folder itself"):
            inside(path, root)


def test_inside_follows_symlinks(layout):
    """A link inside the root that points out of it is outside: writing through it writes outside."""
    root, outside = layout
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(EMMError, match="outside"):
        inside(root / "link", root)
    with pytest.raises(EMMError, match="outside"):
        inside(root / "link" / "keep.txt", root)


def test_inside_accepts_a_root_reached_through_a_symlink(layout, tmp_path):
    root, _ = layout
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert inside(alias / "member", root) == alias / "member"
    assert inside(root / "member", alias) == root / "member"


def test_remove_tree_removes_a_folder_inside_the_root(layout):
    root, _ = layout
    remove_tree(root / "member", root)
    assert not (root / "member").exists() and root.is_dir()
    remove_tree(root / "member", root)  # already gone: nothing to do


def test_remove_tree_refuses_the_root_and_anything_outside(layout):
    root, outside = layout
    for path in [root, root / "", *escapes(root, outside)]:
        with pytest.raises(EMMError):
            remove_tree(path, root)
    assert (root / "member" / "weights.bin").read_text() == "mine"
    assert (outside / "keep.txt").read_text() == "not the stage's"


def test_remove_tree_refuses_a_symlink_that_escapes(layout):
    root, outside = layout
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(EMMError, match="outside"):
        remove_tree(root / "link", root)
    assert (outside / "keep.txt").exists()


def test_remove_tree_removes_a_link_to_a_folder_inside_not_the_folder(layout):
    root, _ = layout
    (root / "link").symlink_to(root / "member", target_is_directory=True)
    remove_tree(root / "link", root)
    assert not (root / "link").is_symlink()
    assert (root / "member" / "weights.bin").read_text() == "mine"


def test_atomic_dir_within_refuses_a_target_outside_before_writing_anything(layout):
    root, outside = layout
    for final in (root / ".." / "x", outside / "sub", root):
        with pytest.raises(EMMError):
            with atomic_dir(final, within=root) as tmp:
                (tmp / "f").write_text("should never be written")
    assert sorted(p.name for p in root.parent.iterdir()) == ["pool-work"]
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]


def test_atomic_dir_within_writes_a_target_inside(layout):
    root, _ = layout
    with atomic_dir(root / "out", within=root) as tmp:
        (tmp / "f").write_text("ok")
    assert (root / "out" / "f").read_text() == "ok"
