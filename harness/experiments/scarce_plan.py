"""The scarce-label benchmark's plan: which cells run, on which data, with which seeds; nothing is trained here.

A *cell* is one measurement: a dataset, the task whose labels are scarce, the fraction of its train/val rows
that keep their label, the planted relatedness (``emm synth`` only) and one seed. Cells that need the very
same data (a *data variant*: same synth table or same ingestion, same label fractions) share it, and share
the pool, fused models and baselines trained on it for a seed, so the plan groups them. Why planning apart
from running: the grid, its seeds and its cost can be read (``--dry-run``) and tested without training, and
the runner only walks the list (headline cells first, so an interrupted run already holds the numbers that
matter most).

The settings live in ``harness/scarce.yaml`` (section ``scarce:``), not in ``harness/benchmark.yaml``'s
profiles: a benchmark profile is one task set on one dataset's rows, while this grid sweeps label fractions,
relatedness levels and a rare-positive table, which no profile field describes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from emm.data.options import SynthConfig
from emm.errors import EMMError
from emm.io import digest, read_yaml
from emm.options import Options

from harness.params import HarnessParams, known_baselines

DEFAULT_SCARCE_CONFIG = Path(__file__).resolve().parents[1] / "scarce.yaml"
SYNTH_SCARCE, SYNTH_RICH = "conversion", "click"
__all__ = ["Cell", "DataVariant", "ScarceProfile", "ScarceConfig", "load_scarce_config", "plan_cells", "variants"]


def _check_fractions(v: list[float]) -> list[float]:
    if any(not 0 < f <= 1 for f in v) or len(set(v)) != len(v):
        raise ValueError(f"fractions must be distinct values in (0, 1], got {v}")
    return v


class Headline(Options):
    """A cell that gets every seed of ``headline_seeds`` (the rest get ``seeds``)."""

    fraction: float = Field(gt=0, le=1)
    shared_weight: float | None = Field(default=None, ge=0, le=1, description="synth cells")
    task: str | None = Field(default=None, description="census cells: the scarce task")


class SynthGrid(Options):
    """`emm synth` cells: conversion scarce (click keeps every label) at each w x fraction, plus rare positives."""

    shared_weights: list[float] = Field(default_factory=lambda: [0.0, 0.6, 0.9], min_length=1)
    fractions: list[float] = Field(default_factory=lambda: [0.005, 0.02, 0.1, 1.0], min_length=1)
    rare_conversion_given_click: float | None = Field(
        default=0.01, gt=0, lt=1, description="a table with rare conversions and every row labelled (None = none)")
    rare_shared_weights: list[float] = Field(default_factory=lambda: [0.9])
    config: dict[str, Any] = Field(default_factory=dict, description="overrides of params.yaml `synth` (rows, ...)")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        return _check_fractions(v)


class CensusGrid(Options):
    """Census cells: each (scarce, rich) pair at each fraction of the scarce task's labels."""

    pairs: list[tuple[str, str]] = Field(default_factory=lambda: [("income", "marital"), ("marital", "income")])
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.2, 1.0], min_length=1)
    raw_rows: int | None = Field(default=None, gt=0, description="first N rows of each raw file (None = all)")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        return _check_fractions(v)


class ScarceProfile(Options):
    """One variant of the benchmark (``full``, ``quick``): the grid, seeds and training budget."""

    seeds: list[int] = Field(default_factory=lambda: [2026], min_length=1)
    headline_seeds: list[int] = Field(default_factory=lambda: [2026, 2027, 2028], min_length=1)
    headline: list[Headline] = Field(default_factory=list)
    max_epochs: int | None = Field(default=None, gt=0, description="cap on every model's epochs")
    baselines: list[str] = Field(default_factory=lambda: ["mmoe", "shared_bottom"])
    lightgbm: bool = True
    recipes: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"cross_residual": {"output": "cross_residual"}},
        description="name -> fuse overrides: fused models beside EMM's default settings")
    synth: SynthGrid = Field(default_factory=SynthGrid)
    census: CensusGrid = Field(default_factory=CensusGrid)

    _known = field_validator("baselines")(known_baselines)


class ScarceConfig(Options):
    out: Path = Field(default=Path("results"), description="results/<dataset>/scarce/ (quick: scarce-quick/)")
    workers: int = Field(default=2, gt=0)
    variants: dict[str, ScarceProfile] = Field(default_factory=lambda: {"full": ScarceProfile()})

    def pick(self, name: str) -> ScarceProfile:
        if name not in self.variants:
            raise EMMError(f"scarce benchmark variant {name!r} is not in the scarce config; known: {sorted(self.variants)}")
        return self.variants[name]


class ScarceFile(Options):
    scarce: ScarceConfig = Field(default_factory=ScarceConfig)


def load_scarce_config(path: Path | str | None = None) -> ScarceConfig:
    """The ``scarce:`` section of ``path`` (default harness/scarce.yaml); unknown keys are errors."""
    path = Path(path) if path is not None else DEFAULT_SCARCE_CONFIG
    if not path.exists():
        raise EMMError(f"scarce benchmark config {path} does not exist (the default is {DEFAULT_SCARCE_CONFIG})")
    try:
        return ScarceFile.model_validate(read_yaml(path, "scarce benchmark config")).scarce
    except ValidationError as exc:
        raise EMMError(f"scarce benchmark config {path} is invalid:\n{exc}") from exc


@dataclass(frozen=True)
class Cell:
    """One measurement: ``task`` scored on its (fully labelled) test rows, trained with ``fraction`` of its
    train/val labels, the other task(s) keeping every label."""

    dataset: str
    family: Literal["synth", "census"]
    task: str
    other: str
    fraction: float
    seed: int
    shared_weight: float | None = None      # synth
    rare: bool = False                      # synth: conversion_given_click lowered, every row labelled
    headline: bool = False

    @property
    def variant(self) -> str:
        """The data variant's key: the cells with one key train on the very same rows and labels."""
        return variant_key(self.family, self.shared_weight, self.rare, {self.task: self.fraction})

    @property
    def group(self) -> str:
        """The cell without its seed: what a table row and a pooled-over-seeds CI are about."""
        if self.family == "synth":
            what = "rare positives" if self.rare else f"{self.task} {self.fraction:.1%}"
            return f"w={self.shared_weight:.1f}, {what}"
        return f"{self.task} {self.fraction:.0%}, {self.other} full"

    @property
    def key(self) -> str:
        frac = f"{self.task}-{self.fraction:g}"
        w = f"w{self.shared_weight:.2f}-" if self.shared_weight is not None else ""
        return f"{w}{'rare-' if self.rare else ''}{frac}-seed-{self.seed}"


def variant_key(family: str, shared_weight: float | None, rare: bool, fractions: dict[str, float]) -> str:
    """Folder name of a data variant: ``w0.90-conversion-0.02``, ``w0.90-rare-full``, ``income-0.01``, ``full``."""
    kept = {t: f for t, f in sorted(fractions.items()) if f < 1}
    labels = "-".join(f"{t}-{f:g}" for t, f in kept.items()) or "full"
    prefix = f"w{shared_weight:.2f}-" if family == "synth" else ""
    return f"{prefix}{'rare-' if rare else ''}{labels}"


@dataclass
class DataVariant:
    """The data one or more cells share: its key, how to make it and the seeds its jobs run on."""

    key: str
    family: Literal["synth", "census"]
    label_fraction: dict[str, float]
    shared_weight: float | None = None
    rare: bool = False
    cells: list[Cell] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return sorted({c.seed for c in self.cells})


def _is_headline(prof: ScarceProfile, family: str, task: str, fraction: float, w: float | None) -> bool:
    return any(abs(h.fraction - fraction) < 1e-12 and (
        (family == "synth" and h.shared_weight is not None and w is not None and abs(h.shared_weight - w) < 1e-12)
        or (family == "census" and h.task == task)) for h in prof.headline)


def plan_cells(dataset: str, synth_dataset: str, prof: ScarceProfile) -> list[Cell]:
    """Every cell of ``dataset`` (``synth_dataset`` = params.yaml ``synth.dataset`` selects the synth grid,
    anything else the Census grid), headline cells first, then by relatedness, task and fraction."""
    specs: list[tuple[str, str, float, float | None, bool]] = []  # task, other, fraction, w, rare
    if dataset == synth_dataset:
        family = "synth"
        g = prof.synth
        specs += [(SYNTH_SCARCE, SYNTH_RICH, f, w, False) for w in g.shared_weights for f in g.fractions]
        if g.rare_conversion_given_click is not None:
            specs += [(SYNTH_SCARCE, SYNTH_RICH, 1.0, w, True) for w in g.rare_shared_weights]
    elif dataset == "census-income":
        family = "census"
        specs += [(task, other, f, None, False) for task, other in prof.census.pairs for f in prof.census.fractions]
    else:
        raise EMMError(f"the scarce benchmark runs on `emm synth` tables ({synth_dataset!r}, params.yaml "
                       f"synth.dataset) and on census-income, not {dataset!r}")
    cells = []
    for task, other, fraction, w, rare in specs:
        head = not rare and _is_headline(prof, family, task, fraction, w)
        for seed in (prof.headline_seeds if head else prof.seeds):
            cells.append(Cell(dataset, family, task, other, fraction, seed, w, rare, head))
    order = {c.group: i for i, c in enumerate(cells)}
    return sorted(cells, key=lambda c: (not c.headline, order[c.group], c.seed))


def variants(cells: list[Cell]) -> list[DataVariant]:
    """The cells grouped by the data they train on, in the order of their first cell."""
    out: dict[str, DataVariant] = {}
    for c in cells:
        v = out.setdefault(c.variant, DataVariant(c.variant, c.family, {c.task: c.fraction} if c.fraction < 1 else {},
                                                  c.shared_weight, c.rare))
        v.cells.append(c)
    return list(out.values())


def synth_config(cfg: HarnessParams, prof: ScarceProfile, v: DataVariant) -> SynthConfig:
    """The `emm synth` table of a synth variant: params.yaml ``synth`` + the grid's overrides + the variant."""
    update: dict[str, Any] = {**prof.synth.config, "shared_weight": v.shared_weight,
                              "label_fraction": dict(v.label_fraction)}
    if v.rare:
        update["conversion_given_click"] = prof.synth.rare_conversion_given_click
    try:
        return SynthConfig.model_validate({**cfg.synth.model_dump(mode="json"), **update})
    except ValidationError as exc:
        raise EMMError(f"scarce benchmark: the synth settings of {v.key} are invalid:\n{exc}") from exc


def cell_signature(cell: Cell, data: dict[str, Any], cfg: HarnessParams, prof: ScarceProfile) -> str:
    """What a stored cell result was made from: the cell, its data's settings and every training setting,
    so a stored result is reused only when nothing that made it changed."""
    return digest({"cell": asdict(cell) | {"headline": None}, "data": data,
                   "pretrain": cfg.pretrain.model_dump(mode="json"), "fuse": cfg.fuse.model_dump(mode="json"),
                   "decompose": cfg.decompose.model_dump(mode="json"), "max_epochs": prof.max_epochs,
                   "baselines": prof.baselines, "lightgbm": prof.lightgbm, "recipes": prof.recipes})
