"""The harness's settings: ``harness/benchmark.yaml`` (its ``benchmark:`` section) beside emm's params.yaml.

Why a file of its own: the paper's experiments are not a pipeline stage (no DVC stage reads them), so their
profiles, seeds and output folder are no part of the strict ``Params`` every stage validates; emm refuses a
params file that still carries a ``benchmark:`` section and says where it went. The experiments read both
files through ``load_harness_params``: emm's params file for what they share with the stages (paths, ingest,
the pool, decompose, fuse, tracking, synth), this one for what only they need. Unknown keys are errors here
too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from emm.errors import EMMError
from emm.io import read_yaml
from emm.fusion.options import ABLATIONS, AblationName
from emm.models.baselines.registry import BASELINES
from emm.models.embedding import NumericOptions
from emm.options import Options
from emm.pipeline.params import Params, load_params

DEFAULT_CONFIG = Path(__file__).with_name("benchmark.yaml")
BASELINE_NAMES = tuple(BASELINES)


def known_baselines(cls: type, names: list[str]) -> list[str]:
    """The one check of a baseline list (every config that names baselines uses it as a field validator)."""
    unknown = [n for n in names if n not in BASELINE_NAMES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {list(BASELINE_NAMES)}")
    return names

__all__ = ["BASELINE_NAMES", "DEFAULT_CONFIG", "BenchmarkConfig", "BenchmarkProfile", "HarnessParams",
           "RelatednessConfig", "known_baselines", "load_harness_params"]


class BenchmarkProfile(Options):
    """How much of the benchmark to run. Every model in one profile gets the same budget: the pool and
    the baselines train with ``pretrain.train``, the fused variants with ``fuse.train``, each with the
    run's seed and (optionally) a smaller epoch cap."""

    seeds: list[int] = Field(default_factory=lambda: [2026, 2027, 2028], min_length=1)
    raw_rows: int | None = Field(default=None, gt=0, description="first N rows of each raw file (None = all)")
    max_epochs: int | None = Field(default=None, gt=0, description="cap on every model's epochs (None = as trained)")
    baselines: list[str] = Field(default_factory=lambda: list(BASELINE_NAMES))
    ablations: list[AblationName] = Field(
        default_factory=lambda: list(ABLATIONS), description="Table II rows; `full` is EMM itself (always run)")
    lightgbm: bool = True
    task_sets: dict[str, list[list[str]]] = Field(
        default_factory=dict, description="dataset -> extra task lists for the Figure 3 runs")
    task_set_methods: list[str] = Field(
        default_factory=lambda: ["mmoe", "ple", "aitm", "adatt"],
        description="baselines run beside the pool and EMM on the extra task sets")
    task_set_seeds: int = Field(default=1, gt=0, description="how many of `seeds` the extra task sets use")
    ablation_seeds: int | None = Field(
        default=None, gt=0, description="how many of `seeds` Table II's variants other than `full` (EMM itself, "
        "always every seed) use; None = all. Table II then compares every variant on the seeds all of them ran")
    recipe_seeds: int | None = Field(
        default=None, gt=0, description="how many of `seeds` the recipes use (None = all); recipes.md pairs each "
        "recipe with the default on the seeds it ran")
    recipes: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> fuse settings (overrides of params.yaml `fuse`): extra fused "
        "models trained on each seed's pool, compared in recipes.md; `members: networks` fuses the pool's networks "
        "alone (a recipe whose output keeps no donors, `output: tower`, cannot take tree members)")
    numeric: NumericOptions | None = Field(
        default=None, description="the dense-feature encoding of every pool model and baseline alike (the fused "
        "model follows its pool); None = as each pool entry says (minmax unless set)")
    jobs_from: str | None = Field(
        default=None, description="another profile whose job store (<out>/<dataset>/raw/<that profile>/) this one "
        "runs in: its finished pools, fused models and baselines are reused wherever a job's inputs are the "
        "same (the job signatures decide), so a profile of extra recipes trains only what is new")

    _known_baselines = field_validator("baselines", "task_set_methods")(known_baselines)


class RelatednessConfig(Options):
    """`emm relatedness`: the paper says fusion gains shrink when tasks are weakly related. The sweep
    plants a known relation (``synth.shared_weight``, the share of each task's signal from a latent both
    tasks see), trains a pool and fuses it at each level, and compares the fused model with its donors
    on the same test rows, under the oracle's AUC (the true probabilities) as the ceiling."""

    shared_weights: list[float] = Field(default_factory=lambda: [0.0, 0.3, 0.6, 0.9], min_length=1,
                                        description="the relatedness levels (synth.shared_weight) swept")
    rows: int | None = Field(default=None, gt=0, description="rows per synthetic table (None = synth.rows)")
    seeds: list[int] = Field(default_factory=lambda: [2026], min_length=1)
    max_epochs: int | None = Field(default=None, gt=0, description="cap on every model's epochs (None = as trained)")
    lightgbm: bool = True
    recipes: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"paper": {"output": "tower"}},
        description="name -> fuse overrides: other fused models swept beside EMM's default")

    @field_validator("shared_weights")
    @classmethod
    def _weights(cls, weights: list[float]) -> list[float]:
        if any(not 0 <= w <= 1 for w in weights) or len(set(weights)) != len(weights):
            raise ValueError(f"shared_weights must be distinct values in [0, 1], got {weights}")
        return weights


class BenchmarkConfig(Options):
    """`emm benchmark`: Table I, Table II and Figure 3."""

    out: Path = Field(default=Path("results"), description="results/<dataset>/ tables, plots, per-run json")
    workers: int = Field(default=2, gt=0, description="training processes in parallel, one torch thread each")
    profile: str = "full"
    profiles: dict[str, BenchmarkProfile] = Field(default_factory=lambda: {"full": BenchmarkProfile()})
    baseline_size: dict[str, dict[str, list[int]]] = Field(
        default_factory=lambda: {"census-income": {"expert_hidden": [16], "tower": [8]}},
        description="dataset -> {expert_hidden, tower} of the baselines (paper IV-C: Census [16]/[8])")
    default_baseline_size: dict[str, list[int]] = Field(
        default_factory=lambda: {"expert_hidden": [128], "tower": [128]},
        description="baseline size for a dataset not in baseline_size (paper IV-C: the Ali datasets)")

    relatedness: RelatednessConfig = Field(default_factory=RelatednessConfig)

    @model_validator(mode="after")
    def _shared_stores(self) -> BenchmarkConfig:
        """A profile may run in another's job store only where the two would build the same task-set data."""
        for name, prof in self.profiles.items():
            if prof.jobs_from is None:
                continue
            host = self.profiles.get(prof.jobs_from)
            if host is None or host.jobs_from is not None or prof.jobs_from == name:
                raise ValueError(f"profile {name!r}: jobs_from {prof.jobs_from!r} must name another profile that "
                                 f"has its own job store; profiles with one: "
                                 f"{sorted(n for n, p in self.profiles.items() if p.jobs_from is None)}")
            if prof.raw_rows != host.raw_rows:
                raise ValueError(f"profile {name!r}: raw_rows {prof.raw_rows} differs from {prof.jobs_from!r}'s "
                                 f"{host.raw_rows}, so the two cannot share one job store (its task-set data); "
                                 f"give them the same raw_rows or drop jobs_from")
        return self

    def store(self, name: str) -> str:
        """The profile whose job store ``name`` runs in (itself unless it sets ``jobs_from``)."""
        return self.pick(name).jobs_from or name

    def pick(self, name: str | None) -> BenchmarkProfile:
        name = name or self.profile
        if name not in self.profiles:
            raise EMMError(f"benchmark profile {name!r} is not in the harness config; known: {sorted(self.profiles)}")
        return self.profiles[name]


class HarnessFile(Options):
    """The whole harness config file; an unknown section or key anywhere is an error."""

    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)


class HarnessParams(Params):
    """emm's params (every stage's section, validated as the stages validate them) plus the harness's
    ``benchmark`` section: what the experiments read as one ``cfg``."""

    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)


def load_harness_config(path: Path | str | None = None) -> BenchmarkConfig:
    """The ``benchmark:`` section of ``path`` (default: harness/benchmark.yaml, shipped with the harness)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.exists():
        raise EMMError(f"harness config {path} does not exist (the default is {DEFAULT_CONFIG})")
    raw = read_yaml(path, "harness config")
    try:
        return HarnessFile.model_validate(raw).benchmark
    except ValidationError as exc:
        raise EMMError(f"harness config {path} is invalid:\n{exc}") from exc


def load_harness_params(params: Path | str | None = None, config: Path | str | None = None) -> HarnessParams:
    """emm's params file (``load_params``: ./params.yaml by default) and the harness config, as one object."""
    base = load_params(params)
    return HarnessParams(**dict(base), benchmark=load_harness_config(config))
