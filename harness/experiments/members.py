"""Which of a seed's pool members a fused model fuses: the whole pool, or its network members alone.

Why two: a tree member (``arch: lightgbm``) cannot be cut, so it joins the fused model at the output, as one more
donor in its task's blend (``emm.pipeline.decompose`` plans the networks only, ``emm.pipeline.fuse`` fuses the
whole pool). Table I then asks two things of one pool: what the tree donors add (EMM with tree donors against
the same recipe on the networks alone, the paper's EMM), and whether the hybrid clears LightGBM. And a recipe
whose output keeps no donors (``output: tower``) cannot take a tree at all: it says ``members: networks``.

A view is one config value, ``members``, on a recipe's settings and on a decompose or fused job's config: the
view names the pool folder and component store (each written by that view's own decompose job, from the pool
jobs the view keeps) that the fused job reads. A view that keeps every member of a pool *is* the whole pool
(``resolve``), so a pool without trees plans exactly the jobs, and signatures, it had before views existed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from emm.errors import EMMError
from emm.models.trees import is_tree_spec

MEMBERS = "members"          # the config key: a recipe's setting, a decompose / fused job's config
NETWORKS_EMM = "networks-only"  # the fused job (ablation full, the default recipe) on the networks view


class PoolView:
    """The whole pool: ``pool/`` and ``components/`` of the seed, as before trees could join."""

    name: ClassVar[str] = "all"
    decompose_method: ClassVar[str] = "pool"  # the decompose job's method (its key: ``decompose-<method>``)

    def keeps(self, spec: Any) -> bool:
        """Whether a pool member (its parsed entry) is fused under this view."""
        return True

    def folders(self, seed_dir: Path) -> tuple[Path, Path]:
        """(pool folder, component store) of this view in a seed's folder."""
        return Path(seed_dir) / "pool", Path(seed_dir) / "components"


class NetworksOnly(PoolView):
    """The pool's network members alone, in ``pool-networks/`` and ``components-networks/``."""

    name: ClassVar[str] = "networks"
    decompose_method: ClassVar[str] = "networks"

    def keeps(self, spec: Any) -> bool:
        return not is_tree_spec(spec)

    def folders(self, seed_dir: Path) -> tuple[Path, Path]:
        return Path(seed_dir) / "pool-networks", Path(seed_dir) / "components-networks"


VIEWS: dict[str, PoolView] = {v.name: v for v in (PoolView(), NetworksOnly())}
WHOLE = PoolView.name


def view_of(config: Mapping[str, Any]) -> PoolView:
    """The view a decompose or fused job runs on (its config's ``members``; the whole pool when unset)."""
    return VIEWS[config.get(MEMBERS, WHOLE)]


def resolve(name: str, specs: Iterable[Any], where: str) -> PoolView:
    """The view ``name`` plans as on a pool of ``specs``: one keeping every member is the whole pool.
    ``where`` names the setting in the error for an unknown view."""
    if name not in VIEWS:
        raise EMMError(f"{where}: members {name!r} is not one of {sorted(VIEWS)} (the whole pool, or its networks "
                       "alone)")
    view = VIEWS[name]
    return VIEWS[WHOLE] if all(view.keeps(s) for s in specs) else view


def split_recipe(name: str, settings: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A recipe's settings -> (the view it fuses, the fuse overrides it sets)."""
    fuse = {k: v for k, v in settings.items() if k != MEMBERS}
    members = settings.get(MEMBERS, WHOLE)
    if members not in VIEWS:
        raise EMMError(f"recipe {name!r}: members {members!r} is not one of {sorted(VIEWS)}")
    return members, fuse


def check_recipes(recipes: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse a recipe naming an unknown view before any work (the benchmark calls it before it ingests)."""
    for name, settings in recipes.items():
        split_recipe(name, settings)


def job_config(view: PoolView) -> dict[str, str]:
    """What a job's config says of its view: nothing for the whole pool (so its signature is as before)."""
    return {} if view.name == WHOLE else {MEMBERS: view.name}


def is_tree_result(result: Mapping[str, Any]) -> bool:
    """Whether a pool job's result is a tree member's (stored results from before trees joined are networks)."""
    return result.get("kind") == "pool" and result.get("member") == "tree"
