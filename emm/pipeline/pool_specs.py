"""Which members a pool has: the configured entries of ``pretrain.pool`` (or two default models per task),
each typed and checked before anything is trained or imported, with ``pretrain.numeric`` filled in.

Why apart from ``pretrain``: the benchmark and the stage cache ask this question too, without training.
"""

from __future__ import annotations

from typing import Any

from emm.data.schema import Schema
from emm.errors import EMMError
from emm.models.external import FactoryMember, Member, parse_member, pin_weights, source_of
from emm.models.names import name_key
from emm.models.trees import TreeFileMember, pin_tree_file
from emm.pipeline.params import PretrainConfig

ALTERNATES = ("dcn", "resmlp", "mlp-deep")
DEFAULT_SPINE = [128, 64, 16]


def default_pool(task_names: list[str], spine: list[int] | None = None) -> list[dict]:
    """Two models per task: a plain MLP (the paper's TM) and one other structure, cycling through
    DCN-v2, residual MLP and a deeper MLP, all around the same spine of widths."""
    spine = spine or DEFAULT_SPINE
    specs = []
    for i, task in enumerate(task_names):
        specs.append({"name": f"{task}-mlp", "task": task, "arch": "mlp", "hidden": spine})
        alt = ALTERNATES[i % len(ALTERNATES)]
        if alt == "mlp-deep":
            specs.append({"name": f"{task}-mlp-deep", "task": task, "arch": "mlp", "hidden": [spine[0], *spine]})
        else:
            specs.append({"name": f"{task}-{alt}", "task": task, "arch": alt, "hidden": spine})
    return specs


def with_numeric(entry: Any, cfg: PretrainConfig) -> Any:
    """A built-in network entry with ``pretrain.numeric`` filled in unless it sets its own encoding (a tree
    reads the dense values as they are)."""
    if isinstance(entry, dict) and "arch" in entry and entry["arch"] != "lightgbm" and "numeric" not in entry:
        return {**entry, "numeric": cfg.numeric.model_dump(mode="json")}
    return entry


def pool_specs(dataset: str, cfg: PretrainConfig, schema: Schema) -> list[Member]:
    """The pool members of ``dataset``: built-in specs, MLflow, factory and tree-file entries (files pinned by
    sha256).

    Refused here, before anything is trained or imported: an entry of no known kind, a name that is not a plain
    file name (``emm.models.names``), two names that differ at most in case, an entry for a task the data
    lacks. A task with no entry is only warned about by ``pretrain`` (a pool may be built up in parts); the
    decompose stage refuses it, as nothing could fuse it.
    """
    raw = cfg.pool.get(dataset) or default_pool(schema.task_names)
    where = f"pretrain.pool.{dataset}"
    members = [parse_member(with_numeric(s, cfg), f"{where}[{i}]") for i, s in enumerate(raw)]
    keys = [name_key(m.name) for m in members]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        listed = ", ".join(f"[{i}] {m.name!r} ({source_of(m)})" for i, m in enumerate(members) if keys[i] in dupes)
        raise EMMError(f"{where}: model names must be unique (ignoring case), but {dupes} name more than one entry "
                       f"({listed}); rename one (the name is its file in pool/, one file for 'M' and 'm' on a "
                       "case-insensitive filesystem, and its MLflow run)")
    for m in members:
        if m.task not in schema.task_names:
            raise EMMError(f"{where}: model {m.name!r} is for task {m.task!r}, but the ingested "
                           f"data has tasks {schema.task_names}")
    return [pin_weights(m) if isinstance(m, FactoryMember) else pin_tree_file(m) if isinstance(m, TreeFileMember)
            else m for m in members]
