"""Name -> builder for the multi-task baselines, so configs and the CLI can pick one by name."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from emm.data.schema import Schema
from emm.errors import EMMError
from emm.models.baselines.adatt import build_adatt
from emm.models.baselines.aitm import build_aitm
from emm.models.baselines.mmoe import build_mmoe
from emm.models.baselines.ple import build_ple
from emm.models.baselines.shared_bottom import build_shared_bottom

BASELINES: dict[str, Callable[..., nn.Module]] = {
    "shared_bottom": build_shared_bottom,
    "mmoe": build_mmoe,
    "ple": build_ple,
    "aitm": build_aitm,
    "adatt": build_adatt,
}


def build_baseline(name: str, schema: Schema, **kwargs: Any) -> nn.Module:
    """A fresh baseline ``name`` on ``schema``; ``kwargs`` go to its builder (paper-sized defaults)."""
    if name not in BASELINES:
        raise EMMError(f"unknown baseline {name!r}; known baselines: {', '.join(sorted(BASELINES))}")
    return BASELINES[name](schema, **kwargs)
