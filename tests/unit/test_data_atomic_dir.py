"""``atomic_dir`` removes temporary siblings that dead runs left behind, and never those of live runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emm.io import atomic_dir

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

# enters atomic_dir, reports its temp folder, waits for a line on stdin, then finishes normally
HOLDER = ("import sys\nfrom pathlib import Path\nfrom emm.io import atomic_dir\n"
          "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
          "    (tmp / 'result.txt').write_text('from the holder')\n"
          "    print(tmp, flush=True)\n"
          "    sys.stdin.readline()\n")


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def leftover_from(target: Path, pid: int) -> Path:
    """A temp sibling named as the process ``pid`` would name it."""
    from emm import io

    folder = target.parent / io._temp_name(target, "tmp", pid=pid)
    folder.mkdir(parents=True)
    (folder / "train.parquet").write_bytes(b"PAR1 half a file")
    return folder


def test_temp_names_carry_host_and_pid(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        from emm import io

        assert io._owner(tmp_path / "out", tmp.name) == (io._host_tag(), os.getpid())


def test_dead_runs_leftovers_are_removed(tmp_path):
    target = tmp_path / "out"
    stale = leftover_from(target, dead_pid())
    with atomic_dir(target) as tmp:
        assert not stale.exists()
        (tmp / "x").write_text("new")
    assert siblings(target) == [] and (target / "x").read_text() == "new"


def test_live_runs_temp_folder_survives_a_concurrent_run(tmp_path):
    target = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        held = Path(holder.stdout.readline().strip())
        assert held.parent == tmp_path and (held / "result.txt").exists()
        with atomic_dir(target) as tmp:
            (tmp / "result.txt").write_text("from the test")
        assert held.exists() and (target / "result.txt").read_text() == "from the test"
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    assert (target / "result.txt").read_text() == "from the holder"  # the holder finished and replaced it
    assert siblings(target) == []


def test_other_hosts_and_other_targets_are_left_alone(tmp_path, monkeypatch):
    from emm import io

    target = tmp_path / "out"
    pid = dead_pid()
    other_target = leftover_from(tmp_path / "out2", pid)
    monkeypatch.setattr(io, "_host_tag", lambda: "0" * 8)
    other_host = leftover_from(target, pid)  # a dead pid here says nothing about a process on another host
    monkeypatch.undo()
    with atomic_dir(target):
        pass
    assert other_target.exists() and other_host.exists()


@pytest.mark.parametrize("age_h, removed", [(25, True), (1, False)])
def test_old_style_leftovers_are_removed_only_when_old(tmp_path, age_h, removed):
    """Names without a pid (written before pids were recorded): only age tells they are abandoned."""
    target = tmp_path / "out"
    legacy = tmp_path / ".out.tmp-1a2b3c4d"
    legacy.mkdir()
    (legacy / "train.parquet").write_bytes(b"PAR1")
    then = time.time() - age_h * 3600
    os.utime(legacy, (then, then))
    with atomic_dir(target):
        pass
    assert legacy.exists() is not removed


def test_previous_output_of_a_run_killed_while_swapping_is_kept(tmp_path):
    """Killed between moving the old output aside and moving the new one in: the '.old-' copy is the only one."""
    from emm import io

    target = tmp_path / "out"
    old = tmp_path / io._temp_name(target, "old", pid=dead_pid())
    old.mkdir()
    (old / "schema.json").write_text("{}")
    with pytest.raises(RuntimeError), atomic_dir(target):
        assert old.exists()
        raise RuntimeError("this run fails too")
    assert old.exists()
    with atomic_dir(target) as tmp:
        (tmp / "schema.json").write_text("{}")
    assert siblings(target) == []  # once a new output exists, the superseded copy goes


@pytest.mark.parametrize(("error", "alive"), [(ProcessLookupError, False), (PermissionError, True), (OSError, True)])
def test_a_pid_counts_as_dead_only_when_it_certainly_is(monkeypatch, error, alive):
    """Another user's process exists (PermissionError); any other OSError cannot tell, so the pid stays alive."""
    from emm import io

    assert io.pid_alive(os.getpid()) and not io.pid_alive(dead_pid())

    def kill(pid, sig):
        raise error

    monkeypatch.setattr(io.os, "kill", kill)
    assert io.pid_alive(12345) is alive
