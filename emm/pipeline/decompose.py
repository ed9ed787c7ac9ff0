"""Stage 3, ``decompose``: the trained pool on disk -> a plan + component store on disk, and back.

The example batch that fixes the traced shapes is the first rows of the validation split, so the plan
depends only on the pool and the schema (not on which rows are drawn).

A pool may mix built-in and imported members (``emm.models.pool.build_member`` rebuilds both as plain
modules). The plan lists members rebuilt from a spec first, in pool order, then the portable (imported) ones: the fused
model's fresh embedding is sized from the first level-0 embedding table it finds, which must be EMM's
shared table, not an outside model's per-feature one. Tree members (LightGBM, XGBoost) have no layers to cut:
the plan leaves them out and names them in plan.json's ``output_members``, the members that join the fused
model at the output (``output_order``). Where the members share no identical layer the
error says so and names ``decompose.align: project``; a member with no single-tensor cut point at all
(a wide or FM branch beside the deep tower) is named as one no alignment can cut.

The pool is read through ``emm.models.pool.load_pool`` (every member's entry, signature, weights digest and
finite weights checked; against the params' pool when run as a stage), and the components record the
pool they were cut from (``pool_digest``), so fuse refuses components another pool left behind.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.fusion.decompose import Plan, decompose, trace_model
from emm.fusion.options import DecomposeConfig
from emm.fusion.store import load_plan, save_plan
from emm.models.pool import PoolEntry, PortableSpec, load_pool, pool_digest
from emm.models.trees import is_tree_spec
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import Params, load_params
from emm.pipeline.pretrain import pool_signatures

NO_COMMON = "share no identical layer"  # the start of emm.fusion.decompose's no-common-level message


def example_batch(data_dir: Path, schema: Schema, rows: int):
    val = load_split(data_dir, "val", schema).head(rows)
    return val.sparse, val.dense


def plan_order(entries: list[PoolEntry]) -> list[int]:
    """Indices of the pool's network members in plan order: built-in ones first (see the module docstring);
    tree members are not in the plan (``output_order``)."""
    nets = [i for i, e in enumerate(entries) if not is_tree_spec(e.spec)]
    return sorted(nets, key=lambda i: isinstance(entries[i].spec, PortableSpec))


def output_order(entries: list[PoolEntry]) -> list[int]:
    """Indices of the members that join the fused model at the output (the trees), in pool order."""
    return [i for i, e in enumerate(entries) if is_tree_spec(e.spec)]


def fused_pool(entries: list[PoolEntry]) -> str:
    """Which pool a fused model is fused from (``fused.json``'s ``made_from.pool``, the checkpoint's ``pool``):
    every member's identity (``pool_digest``), the networks in plan order, then the tree members in pool order
    (``output_order``). ``entries``: the whole pool, in pool order. A pool without trees gives the digest its
    components record (``emm.pipeline.decompose``), as before trees could join."""
    return pool_digest([entries[i] for i in plan_order(entries)] + [entries[i] for i in output_order(entries)])


def output_members(entries: list[PoolEntry]) -> list[dict]:
    """What plan.json records of each output member: name, task, format and its file's digest."""
    return [{"name": entries[i].name, "task": entries[i].task, "format": entries[i].spec.format,
             "weights_sha256": entries[i].weights_sha256} for i in output_order(entries)]


def decompose_pool(data_dir: Path, pool_dir: Path, out_dir: Path, cfg: DecomposeConfig, *,
                   expected: dict[str, dict] | None = None) -> tuple[Plan, list[PoolEntry]]:
    """Decompose every pool model (Algorithm 1) and write the component store to ``out_dir``.

    ``expected``: the signatures the params' pool gives (``stage_pool_signatures``), checked against pool.json.
    """
    schema = Schema.load(data_dir)
    everything = load_pool(pool_dir, schema, expected)
    outputs = output_members([e for e, _ in everything])
    pool = [everything[i] for i in plan_order([e for e, _ in everything])]
    if len(pool) < 2:
        trees = f" besides {len(outputs)} tree model(s), which join at the output and are not cut" if outputs else ""
        raise EMMError(f"{pool_dir} holds {len(pool)} network model(s){trees}; fusion needs at least 2 networks to "
                       "decompose")
    lonely = [t for t in schema.task_names if t not in {e.task for e, _ in pool}]
    if lonely:
        held = [(e.name, e.task) for e, _ in everything]
        raise EMMError(f"task(s) {lonely} have no model in {pool_dir} to decompose (it holds {held}; a tree model "
                       f"joins at the output, beside a network of its task), so the fused model could not score "
                       f"them; nothing was written to {out_dir}. Add an entry for each to pretrain.pool."
                       f"{schema.dataset} (built-in `arch:`, MLflow `uri:` or your own `factory:` + `weights:`) and "
                       "run `emm pretrain`, or ingest without those tasks")
    entries, models = [e for e, _ in pool], [m for _, m in pool]
    made_from = {"pool": pool_digest(entries)}  # in plan order: the order of the models in the store
    example = example_batch(data_dir, schema, cfg.example_rows)
    try:
        plan = decompose(models, example, names=[e.name for e in entries], align=cfg.align, levels=cfg.levels,
                         head=cfg.head)
    except EMMError as exc:
        raise explain(exc, entries, models, example, cfg) from exc
    plan.output_members = outputs
    save_plan(plan, out_dir, model_names=[e.name for e in entries], tasks=[e.task for e in entries],
              made_from=made_from)
    return plan, entries


def explain(exc: EMMError, entries: list[PoolEntry], models: list[nn.Module], example: tuple[Tensor, Tensor],
            cfg: DecomposeConfig) -> EMMError:
    """A decomposition failure, said in pool terms: members no alignment can cut, or the align setting to try."""
    if "cut point" not in str(exc) and NO_COMMON not in str(exc):
        return exc
    uncuttable = [(e, type(m).__name__) for e, m in zip(entries, models)
                  if not trace_model(m, example, name=e.name, head=cfg.head).cut_valid()]
    if uncuttable:
        named = ", ".join(f"{e.name!r} ({kind}, {e.source})" for e, kind in uncuttable)
        return EMMError(
            f"pool model(s) {named} have no point where a single tensor carries everything downstream: a branch (a "
            "wide or FM part, say) stays live beside the deep tower all the way to the output, so Algorithm 1 cannot "
            "cut them into components with either decompose.align. Remove them from pretrain.pool, or give them one "
            "path (e.g. torch-rechub DCNv2 with model_structure='stacked' rather than WideDeep or DeepFM)")
    if cfg.align == "identical" and NO_COMMON in str(exc):
        outside = [e.name for e in entries if e.source != "builtin"]
        note = f" (outside models in this pool: {outside})" if outside else ""
        return EMMError(f"{exc}\nThe pool's members share no identical layer{note}: set "
                        "`decompose: {align: project}` in params.yaml to cut every member at equal relative depth "
                        "with trained adapters between them")
    return exc


def load_pool_plan(data_dir: Path, pool_dir: Path, components_dir: Path, cfg: DecomposeConfig, *,
                   expected: dict[str, dict] | None = None) -> tuple[Plan, list[PoolEntry]]:
    """Rebuild the saved plan: the pool's members give the structure, the store the weights.

    The members are loaded (``load_pool``), not only built, so a stage that never runs them still refuses a
    damaged pool; and the store must have been cut from this very pool (``pool_digest``), else it is stale.
    """
    schema = Schema.load(data_dir)
    everything = load_pool(pool_dir, schema, expected)
    pool = [everything[i] for i in plan_order([e for e, _ in everything])]
    entries = [e for e, _ in pool]
    plan = load_plan(components_dir, [m for _, m in pool], example_batch(data_dir, schema, cfg.example_rows),
                     made_from={"pool": pool_digest(entries)})
    plan.output_members = output_members([e for e, _ in everything])
    return plan, entries


def stage_pool_signatures(cfg: Params, dataset: str) -> dict[str, dict]:
    """What a stage run from params checks pool.json against: the params' pool on the ingested data."""
    return pool_signatures(dataset, cfg.pretrain, Schema.load(stage_dir(cfg, dataset, "data")))


def decompose_stage(dataset: str, params: Path | str | None = None) -> tuple[Plan, list[PoolEntry]]:
    cfg = load_params(params)
    return decompose_pool(stage_dir(cfg, dataset, "data"), stage_dir(cfg, dataset, "pool"),
                          stage_dir(cfg, dataset, "components"), cfg.decompose,
                          expected=stage_pool_signatures(cfg, dataset))
