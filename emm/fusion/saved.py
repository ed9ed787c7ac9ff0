"""A fused model on disk, and the one way to load it back.

On disk: ``fused.json`` (pool specs + decompose settings + the architecture, ``FusedModel.config_dict()``)
and ``fused.safetensors`` (the whole state dict, frozen components included). Rebuilding needs no pickle
and no other folder: fresh pool models from their specs are decomposed again on a dummy batch (the plan
depends only on shapes), the fused architecture is rebuilt on that plan, and the weights loaded.

A member imported from outside (a torch-rechub model, your own class) is in ``pool_specs`` as its
portable graph (``emm.models.pool.PortableSpec``: torch.fx nodes over torch.nn layers, as JSON), so it is
rebuilt here with torch alone: the registered fused model scores where its author's code is not installed.

A tree member (LightGBM, XGBoost: ``emm.models.trees``) is in the architecture as an output member: its native
file's name and sha256 and its ``TreeModel.layout()``, from which ``build_from_config`` rebuilds the empty module
(torch alone again: the registered bundle needs neither library); its tensors load with the rest of the state dict.
``fused/`` also holds the native file itself (``<member>.txt`` / ``.json``, copied from ``pool/`` by
``save_output_files``): ``load_fused`` refuses a file whose sha256 is not the recorded one, and a tree whose loaded
tensors are not the ones its file gives (``check_output_files``), so what scores is what the file says.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from emm.data.schema import Schema, check_fingerprint
from emm.errors import EMMError
from emm.fusion.decompose import decompose
from emm.fusion.fused import FusedModel
from emm.fusion.options import DecomposeConfig
from emm.io import read_json, sha256_file
from emm.models.pool import PortableSpec, build_member, member_spec
from emm.models.single_task import ModelSpec
from emm.models.tree_native import NativeScorer
from emm.models.trees import TreeModel, load_tree
from emm.weights import load_module

FUSED_JSON, FUSED_WEIGHTS = "fused.json", "fused.safetensors"


def architecture(specs: list[ModelSpec | PortableSpec], dcfg: DecomposeConfig, model: FusedModel) -> dict[str, Any]:
    """What ``build_from_config`` needs to rebuild ``model``: recorded as ``fused.json``'s ``architecture``."""
    return {"pool_specs": [s.model_dump(mode="json") for s in specs], "decompose": dcfg.model_dump(mode="json"),
            "fused": model.config_dict()}


def build_from_config(config: dict[str, Any], schema: Schema) -> FusedModel:
    """Rebuild the fused architecture (weights not loaded) from ``fused.json``'s ``architecture``."""
    specs = [member_spec(s) for s in config["pool_specs"]]
    dcfg = DecomposeConfig.model_validate(config["decompose"])
    models = [build_member(s, schema).eval() for s in specs]
    # every feature at its 'unseen' index: valid for EMM's one table and for per-feature tables alike
    unseen = torch.tensor([[f.offset for f in schema.sparse]], dtype=torch.long).repeat(4, 1)
    dummy = (unseen, torch.zeros(4, schema.n_dense))
    plan = decompose(models, dummy, names=[s.name for s in specs], align=dcfg.align, levels=dcfg.levels,
                     head=dcfg.head)
    return FusedModel.from_config(plan, config["fused"])


def load_fused(fused_dir: Path, schema: Schema) -> tuple[FusedModel, dict[str, Any]]:
    """The saved fused model (eval mode) and its ``fused.json``; the data schema must match, and each tree
    member's native file must be the one recorded and give the tensors loaded (``check_output_files``)."""
    meta = read_json(Path(fused_dir) / FUSED_JSON)
    check_fingerprint(meta["schema_fingerprint"], schema, f"fused model in {fused_dir}")
    model = build_from_config(meta["architecture"], schema)
    for member in model.output_members:  # the files first: refuse a changed one before any work
        output_file(fused_dir, member)
    load_module(model, Path(fused_dir) / FUSED_WEIGHTS, what=f"fused model in {fused_dir}", fix="run `emm fuse` again")
    check_output_files(model, fused_dir, schema)
    return model.eval(), meta


def output_file(folder: Path, member: dict[str, Any]) -> Path:
    """A tree member's native file in ``folder`` (``fused/``), checked against the sha256 ``fused.json`` records."""
    name, file = member["name"], str(member["file"])
    if Path(file).name != file or file in ("", ".", ".."):
        raise EMMError(f"fused model in {folder}: tree member {name!r} records file {file!r}, which is not a plain "
                       "file name; fused.json was edited: run `emm fuse` again")
    path = Path(folder) / file
    if not path.is_file():
        raise EMMError(f"fused model in {folder}: tree member {name!r}: its native file {path} is missing; the folder "
                       "is incomplete: run `emm fuse` again")
    sha = sha256_file(path)
    if sha != member["sha256"]:
        raise EMMError(f"fused model in {folder}: tree member {name!r}: its native file {path} has sha256 {sha}, not "
                       f"the {member['sha256']} fused.json records: the file was changed after `emm fuse` wrote it, "
                       "and scoring it would score another model under this name; run `emm fuse` again")
    return path


def save_output_files(model: FusedModel, source_dir: Path, folder: Path) -> None:
    """Copy each tree member's native file from ``source_dir`` (``pool/``) into ``folder`` (the fused model's
    folder being written), checked against the digest the model records."""
    for member in model.output_members:
        shutil.copyfile(Path(source_dir) / member["file"], Path(folder) / member["file"])
        output_file(folder, member)


def kept_trees(model: FusedModel) -> Iterator[tuple[dict[str, Any], TreeModel]]:
    """Each tree member the model runs, with its module: a pruned one's blend weight is 0 everywhere, so it does
    not run and nothing is attached to it."""
    for j, member in enumerate(model.output_members):
        if model.donor_names.index(member["name"]) in model.donors.kept:
            yield member, model.donors.trees[j]


def attach_output_files(model: FusedModel, folder: Path) -> None:
    """Each kept tree member scores from its native file in ``folder`` (its sha256 the recorded one) through its
    library where installed (``emm.models.tree_native``).

    Why not ``check_output_files`` here: rebuilding every forest from its file to compare tensors costs seconds
    per booster, which a served bundle pays at every start. With the library the file is what scores, and the
    file is pinned; the tensors only score where the library is absent."""
    # every file the bundle lists, pruned or not, is the recorded one
    paths = {member["name"]: output_file(folder, member) for member in model.output_members}
    for member, tree in kept_trees(model):
        tree.native = NativeScorer.from_file(paths[member["name"]], member["format"],
                                             tree.features if tree.named else None)


def check_output_files(model: FusedModel, folder: Path, schema: Schema) -> None:
    """Each kept tree member's loaded tensors (and layout) are those its native file in ``folder`` gives: the
    state dict cannot score another tree than the file it carries."""
    for member, loaded in kept_trees(model):
        path = output_file(folder, member)  # its sha256 checked here, so load_tree need not hash it again
        built = load_tree(path, member["format"], schema, member["name"])
        same = built.layout() == loaded.layout() and all(
            torch.equal(t, loaded.state_dict()[k]) for k, t in built.state_dict().items())
        if not same:
            raise EMMError(f"fused model in {folder}: tree member {member['name']!r}: its tensors in {FUSED_WEIGHTS} "
                           f"are not the ones its native file {path} gives; the folder mixes two fuse runs: run "
                           "`emm fuse` again")
        loaded.native = built.native  # the checked file scores it with its library where installed (tree_native)
