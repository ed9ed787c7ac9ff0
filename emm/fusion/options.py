"""What the fusion library takes: decomposition settings, the AKF options, and the ablation table.

Why the ablations are one table: Table II's variants are named in the config, built by the fused
model, ordered by the benchmark and labelled by its report. Each reads this table, so adding or
renaming a variant is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from emm.options import Options


@dataclass(frozen=True)
class Ablation:
    """One Table II variant: are the components the pool's trained ones (frozen), and is MTM on?"""

    name: str
    pretrained: bool
    mtm: bool
    label: str


ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    Ablation("baseline", pretrained=False, mtm=False, label="baseline"),
    Ablation("+mtm", pretrained=False, mtm=True, label="baseline+MTM"),
    Ablation("+pretrained", pretrained=True, mtm=False, label="baseline+p (trained components)"),
    Ablation("full", pretrained=True, mtm=True, label="EMM (fused)"),
)}
AblationName = Literal[tuple(ABLATIONS)]  # type: ignore[valid-type]  # built from the table above
EMBEDDING_MODES = ("retrain", "reuse")
GATE_MODES = ("hard", "scaled", "ste")
ATTENTION_MODES = ("task_query", "self_score")
OUTPUT_MODES = ("tower", "donor_residual")


class DecomposeConfig(Options):
    """Algorithm 1 settings."""

    align: Literal["identical", "project"] = Field(
        default="identical", description="identical = the paper; project = cut at equal relative depth + adapters"
    )
    levels: int | None = Field(default=None, description="project only: number of levels (default: the fewest cuts)")
    head: str | None = Field(default="tower", description="sub-module never cut into: each model's head")
    example_rows: int = Field(default=256, gt=0, description="rows of the batch used to trace shapes")


class AKFOptions(Options):
    """The fused model's architecture: all that ``fused.json`` records about how it was built.

    See emm/fusion/fused.py and emm/fusion/akf.py for what each switch does. Training settings are not
    here on purpose: the same architecture trained differently is the same model class.
    """

    embedding: Literal[tuple(EMBEDDING_MODES)] = Field(  # type: ignore[valid-type]
        default="retrain", description="retrain = the paper (a fresh shared embedding); reuse = the pool's own, frozen"
    )
    fusion_gate: Literal[tuple(GATE_MODES)] = Field(  # type: ignore[valid-type]
        default="scaled", description="hard = paper argmax (no gradient); scaled/ste give the gate a gradient"
    )
    attention: Literal[tuple(ATTENTION_MODES)] = "task_query"  # type: ignore[valid-type]
    ablation: AblationName = Field(default="full", description="Table II variant: baseline = random trainable "
                                   "components, no MTM; +mtm adds MTM; +pretrained = trained frozen components, "
                                   "no MTM; full = EMM")
    qkv_dim: int | None = Field(default=None, description="Q/K width (default: the level's width)")
    tower: list[int] = Field(default_factory=lambda: [8])
    output: Literal[tuple(OUTPUT_MODES)] = Field(  # type: ignore[valid-type]
        default="tower", description="tower = the paper (a fresh tower per task on the last level); "
        "donor_residual = each task's frozen donors whole, blended, plus the AKF towers as a residual that "
        "starts at zero (emm/fusion/blend.py)")
