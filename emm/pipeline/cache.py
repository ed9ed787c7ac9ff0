"""Is a stage already done? Cache keys for orchestrators, from the one table of what each stage reads.

``STAGES`` says, per stage, which stage's output it builds on, which params.yaml sections it reads, which
code it runs and which file marks its output complete. ``dvc.yaml`` declares the same deps and params
for DVC; ``tests/unit/test_stage_table.py`` fails when the two disagree, so Prefect's caching and DVC's
rerun the same things.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import emm
from emm.data.schema import Schema
from emm.errors import EMMError
from emm.io import digest, read_json, tree_digest
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import Params, load_params
from emm.pipeline.pool_specs import pool_specs
from emm.tracking.registry import model_version_exists
from emm.tracking.store import registered_name

CODE_ROOT = Path(emm.__file__).resolve().parent.parent  # code paths below are relative to it, as in dvc.yaml


@dataclass(frozen=True)
class StageInputs:
    upstream: str | None          # the stage whose output this one builds on (its key is chained in)
    params: tuple[str, ...]       # params.yaml sections (dotted: a sub-section)
    code: tuple[str, ...]         # files/folders of code the stage runs
    reads: tuple[str, ...]        # artifact folders it reads (artifacts/<dataset>/<folder>)
    marker: str                   # the file that marks its output complete


STAGES: dict[str, StageInputs] = {
    "ingest": StageInputs(None, ("paths", "ingest", "datasets"), ("emm/data", "emm/pipeline/ingest.py"), (),
                          "data/schema.json"),
    "pretrain": StageInputs("ingest", ("pretrain", "scale"), ("emm/models", "emm/train", "emm/pipeline/pretrain.py",
                                                              "emm/pipeline/pool_specs.py", "emm/pipeline/pool_import.py",
                                                              "emm/pipeline/pool_trees.py", "emm/pipeline/pool_score.py",
                                                              "emm/tracking/external.py",
                                                              "emm/tracking/external_trees.py"),
                            ("data",), "pool/pool.json"),
    "decompose": StageInputs("pretrain", ("decompose",), ("emm/models", "emm/fusion/decompose", "emm/fusion/store.py",
                                                          "emm/fusion/options.py", "emm/pipeline/decompose.py"),
                             ("data", "pool"),
                             "components/plan.json"),
    "fuse": StageInputs("decompose", ("fuse", "decompose", "scale"), ("emm/models", "emm/fusion", "emm/train",
                                                                "emm/pipeline/fuse.py"),
                        ("data", "pool", "components"), "fused/fused.json"),
    "evaluate": StageInputs("fuse", ("tracking",), ("emm/fusion", "emm/train", "emm/models", "emm/tracking",
                                                    "emm/pipeline/evaluate.py", "emm/pipeline/register.py"),
                            ("data", "pool", "fused"),
                            "eval/metrics.json"),
    # logs to the version evaluate registered, so it builds on evaluate (and reads its folder for DVC's order)
    "export": StageInputs("evaluate", ("tracking",), ("emm/fusion", "emm/models", "emm/tracking",
                                                  "emm/pipeline/export.py"), ("data", "fused", "eval"),
                          "export/export.json"),
    # registers to the same model as evaluate (alias fast) and records the fused version it compressed
    "compress": StageInputs("evaluate", ("compress", "tracking"),
                            ("emm/models", "emm/fusion", "emm/train", "emm/tracking", "emm/pipeline/compress.py",
                             "emm/pipeline/evaluate.py", "emm/pipeline/export.py"), ("data", "pool", "fused", "eval"),
                            "compact/compact.json"),
}
# One pool member, trained as its own Prefect task: the pretrain stage's inputs, one model's settings.
STAGES["pretrain-model"] = StageInputs("ingest", ("pretrain.train", "scale"), STAGES["pretrain"].code, ("data",),
                                       "pool-work/{name}/entry.json")


def _section(cfg: Params, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def stage_cache_key(dataset: str, params: Path | str | None, stage: str, name: str | None = None) -> str:
    """A key that changes exactly when the stage's inputs change: the raw data's bytes (for ingest) or the
    upstream stage's key, the params sections the stage reads, the stage's own code, and where it writes.

    Why keys chain instead of hashing upstream *outputs*: outputs carry timestamps (provenance), so a
    recomputed but identical upstream folder would otherwise invalidate everything below it.
    """
    if stage not in STAGES:
        raise EMMError(f"unknown stage {stage!r}; one of {list(STAGES)}")
    cfg = load_params(params)
    inputs = STAGES[stage]
    parts = [stage, dataset, str(cfg.paths.artifacts.resolve()), emm.__version__,
             *(f"{s}={digest(_section(cfg, s))}" for s in inputs.params),
             tree_digest([CODE_ROOT / c for c in inputs.code], suffixes=(".py", ".yaml"))]
    if inputs.upstream is None:
        parts.append(tree_digest([cfg.paths.raw_root / dataset]))
    else:
        parts.append(stage_cache_key(dataset, params, inputs.upstream))
    if stage == "pretrain-model":
        specs = {s.name: s for s in pool_specs(dataset, cfg.pretrain, Schema.load(stage_dir(cfg, dataset, "data")))}
        parts.append(f"{name}={digest(specs[name]) if name in specs else '<unknown>'}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def stage_output_ready(dataset: str, params: Path | str | None, stage: str, name: str | None = None) -> bool:
    """Whether the stage's output folder is still there (its completion file exists): a cached result is
    only worth reusing then; a deleted folder must be recomputed, whatever the cache says."""
    cfg = load_params(params)
    marker = cfg.paths.artifacts / dataset / STAGES[stage].marker.format(name=name)
    if not marker.is_file():
        return False
    if stage == "evaluate":  # its output includes a registry version: void if the MLflow store lost it
        return model_version_exists(registered_name(dataset), cfg.tracking.store,
                                    read_json(marker).get("registered_version"))
    if stage == "compress":  # a compact model that was registered must still be (one that was not has no version)
        version = read_json(marker).get("registered_version")
        return version is None or model_version_exists(registered_name(dataset), cfg.tracking.store, version)
    return True
