"""Small I/O helpers every stage shares: atomic files and folders, digests, checksums, provenance."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from emm import __version__
from emm.errors import EMMError

LEGACY_STALE_S = 24 * 3600  # age after which a temp folder without a pid in its name counts as abandoned


def inside(path: Path, root: Path) -> Path:
    """``path`` as given, once checked to resolve strictly inside ``root``; EMMError otherwise.

    Why: a stage joins names from params.yaml onto its folder and then removes or writes the result; a
    name like ``/abs``, ``../x`` or ``""``, or a symlink left in the folder, would point that at someone
    else's files. Symlinks are followed (writing through a link writes where it points), and ``root``
    itself is refused: removing or replacing it would take every sibling's results with it.
    """
    path = Path(path)
    resolved, base = path.resolve(), Path(root).resolve()
    if resolved == base:
        raise EMMError(f"refusing to write or remove {path}: it is the folder itself ({root}), not an entry inside "
                       "it; a name that is empty or '.' (in params.yaml) leads here, give it a plain name")
    if base not in resolved.parents:
        raise EMMError(f"refusing to write or remove {path}: it resolves to {resolved}, outside {root}, the only "
                       "folder this stage may change; a name that is a path (in params.yaml) or a symlink in "
                       f"{root} leads here: use a plain name, remove the link")
    return path


def remove_tree(path: Path, root: Path) -> None:
    """Remove ``path`` (a folder, a file, or a link: the link only) when it lies strictly inside ``root``.

    Why not ``shutil.rmtree`` directly: see ``inside``; a missing path is nothing to do.
    """
    path = inside(path, root)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextlib.contextmanager
def atomic_dir(final: Path, *, within: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final``, on error it vanishes.

    Why: a killed or failing stage must leave either the previous good output or nothing, never a
    half-written folder that a later stage (or DVC) would trust. A run killed with SIGKILL cannot clean
    up, so every run first removes the temp siblings of ``final`` that dead runs left (see
    ``_remove_stale_siblings`` for why that is safe while other runs write the same target).
    ``within``: the folder ``final`` must lie inside (``inside``), checked before anything is made.
    """
    final = Path(final) if within is None else inside(final, within)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(final)
    tmp = final.parent / _temp_name(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / _temp_name(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _remove_stale_siblings(final)  # an '.old-' copy kept while ``final`` was missing is superseded now


def _host_tag() -> str:
    """A short tag of this machine: a pid only says something about processes on the host that wrote it."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_name(final: Path, kind: str, pid: int | None = None) -> str:
    """``.<name>.<kind>-<host>-<pid>-<random>``: who made the folder, so a later run can tell if it is abandoned."""
    return f".{final.name}.{kind}-{_host_tag()}-{pid or os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner(final: Path, name: str) -> tuple[str, int] | None:
    """(host tag, pid) of a temp sibling of ``final`` named by ``_temp_name``; None for any other name."""
    found = re.fullmatch(rf"\.{re.escape(final.name)}\.(?:tmp|old)-([0-9a-f]{{8}})-(\d+)-[0-9a-f]{{8}}", name)
    return (found.group(1), int(found.group(2))) if found else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid may exist on this host; False only when it certainly does not.

    Callers act (remove a folder, end a run) only on a certain death, so what cannot be told counts as
    alive: a ``PermissionError`` means the process exists (another user's), and any other ``OSError``
    leaves the question open.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_siblings(final: Path) -> None:
    """Remove temp siblings of ``final`` whose writer is certainly gone.

    Safe under concurrent runs on the same target, because a folder is removed only when its name says it
    was made on this host by a process that no longer exists; a live writer's folder is never touched.
    A reused pid errs on the safe side (the folder stays until that pid is free again), and folders made
    on other hosts of a shared filesystem are left alone (their pids mean nothing here). "Older than this
    run" would not be safe: a concurrent run that started earlier is older and still writing. Folders named
    before pids were recorded carry no owner; only age tells, so they go after ``LEGACY_STALE_S``.
    An ``.old-`` folder is the previous output of a run killed while swapping it out; it stays while
    ``final`` is missing, since it is then the only copy.
    """
    legacy = re.compile(rf"\.{re.escape(final.name)}\.(?:tmp|old)-[0-9a-f]{{8}}")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith((f".{final.name}.tmp-", f".{final.name}.old-")):
            continue
        owner = _owner(final, name)
        try:
            if entry.is_symlink() or not entry.is_dir():
                continue
            if owner is not None:
                stale = owner[0] == _host_tag() and not pid_alive(owner[1])
            else:
                stale = bool(legacy.fullmatch(name)) and time.time() - entry.stat().st_mtime > LEGACY_STALE_S
        except OSError:  # vanished meanwhile (another run removed it)
            continue
        if stale and name.startswith(f".{final.name}.old-") and not final.exists():
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def pinned_sha256(path: Path, pin: str | None, *, owner: str, key: str, pin_key: str) -> str:
    """The sha256 of a file a user named in a config entry (``owner``, e.g. "pool model 'x'"), under ``key``;
    an ``EMMError`` when the file is missing, or differs from the digest the user pinned under ``pin_key``."""
    if not path.is_file():
        raise EMMError(f"{owner}: {key} file {path} does not exist (relative paths are read from {Path.cwd()}); "
                       f"point `{key}:` at the file your training wrote")
    sha = sha256_file(path)
    if pin and pin != sha:
        raise EMMError(f"{owner}: {path} has sha256 {sha}, not the pinned {pin_key} {pin}; the file changed: update "
                       "the pin or restore the file")
    return sha


def git_commit(cwd: Path | None = None) -> str | None:
    """The checkout's commit, or None outside a git checkout (recorded, never required)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(params_hash: str, data_hash: str | None = None) -> dict[str, Any]:
    return {
        "emm_version": __version__,
        "git_commit": git_commit(),
        "params_hash": params_hash,
        "data_hash": data_hash,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a temporary sibling renamed over the target): readers never see half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path`` ({} when empty); a syntax error is an EMMError naming ``what`` and the file."""
    import yaml  # local: most callers of emm.io never read YAML

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise EMMError(f"{what} {path} is not valid YAML: {exc}") from exc


def first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """(dotted path, value in ``a``, value in ``b``) of the first place two JSON values differ, or None.

    Why one helper: every record EMM checks against what it was made from (pool.json's signatures, the
    component store's plan and ``made_from``) names the first field that differs in its error.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (where or "the value", a, b)


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise EMMError(f"{path} does not exist: run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EMMError(f"{path} is not valid JSON ({exc}); rerun the stage that writes it") from exc


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it is renamed over ``path``, on error removed.

    Why one helper: every file a reader may open while it is being written (JSON records, checkpoints,
    prediction outputs) must appear whole or not at all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def digest(obj: Any, length: int = 16) -> str:
    """Stable short sha256 of a JSON-able value or a pydantic model: the one hash behind every cache key,
    job signature and params hash, so two caches never disagree about what "the same settings" means."""
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def tree_digest(paths: list[Path], suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 over the relative names and contents of the files under ``paths`` (sorted; missing -> marker)."""
    out = hashlib.sha256()
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
        if not files:
            out.update(f"<missing {root.name}>".encode())
        for f in files:
            if suffixes and f.suffix not in suffixes:
                continue
            out.update(str(f.relative_to(root) if f != root else f.name).encode())
            out.update(f.read_bytes())
    return out.hexdigest()
