"""params.yaml: one strict settings section per stage, shared by the CLI, ``dvc repro`` and the Prefect flow.

Why one file: DVC tracks exactly the sections a stage reads (``params:`` in dvc.yaml) and Prefect passes
the same file to the same stage functions, so a setting has one home and one meaning. The sections the
library takes are declared beside the code that reads them (``emm.data.options``, ``emm.train.options``,
``emm.fusion.options``); this module assembles them and adds what only the pipeline knows (folders,
pool lists, tracking, the benchmark). Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from emm.data.options import IngestConfig, ScaleConfig, SynthConfig
from emm.data.spec import DatasetSpec
from emm.errors import EMMError
from emm.fusion.options import ABLATIONS, AblationName, DecomposeConfig, FuseOptions
from emm.models.embedding import NumericOptions
from emm.models.baselines.registry import BASELINES
from emm.options import Options
from emm.train.options import TrainConfig

DEFAULT_PARAMS_FILE = Path("params.yaml")
BASELINE_NAMES = tuple(BASELINES)
__all__ = ["BASELINE_NAMES", "BenchmarkConfig", "BenchmarkProfile", "DecomposeConfig", "FuseConfig", "IngestConfig",
           "Params", "PathsConfig", "PretrainConfig", "RelatednessConfig", "ScaleConfig", "SynthConfig", "TrackingConfig", "TrainConfig",
           "load_params"]


class PathsConfig(Options):
    """Where raw data, stage artifacts and the MLflow store live (relative to the working directory)."""

    raw_root: Path = Path("data")
    artifacts: Path = Path("artifacts")


class PretrainConfig(Options):
    """The single-task model pool: which models, trained how."""

    train: TrainConfig = TrainConfig()
    pool: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict,
        description="dataset -> list of pool entries, each one of: built-in {name, task, arch, ...} "
        "(emm.models.ModelSpec, trained here), MLflow {name, task, uri, inputs, output, trust_pickle} or factory "
        "{name, task, factory, kwargs, weights, inputs, output} (emm.models.external, imported, never trained); "
        "checked by emm.pipeline.pool_specs.pool_specs; default: two built-in models per task",
    )
    numeric: NumericOptions = Field(
        default_factory=NumericOptions, description="the dense-feature encoding of every built-in pool model "
        "whose entry does not set its own `numeric` (and of the benchmark's baselines): one setting for all alike")
    min_val_auc: float | None = Field(
        default=None, ge=0, le=1,
        description="refuse to write pool/ while a member's val AUC is below this (None = off; members at "
                    "or below chance are always warned about): a degenerate member lowers the pool's mean "
                    "AUC and so inflates the fused model's Gain",
    )


class FuseConfig(FuseOptions):
    """The fuse stage's section: the library's ``FuseOptions`` (architecture, phases, target) as params.yaml
    spells it. See emm/fusion/recipes/ for the architecture's recipes, emm/fusion/procedure/ for the training."""


class TrackingConfig(Options):
    """MLflow: a local SQLite store under mlruns/ unless MLFLOW_TRACKING_URI says otherwise."""

    store: Path = Path("mlruns")
    log_models: bool = True


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
        "models trained on each seed's pool, compared in recipes.md")
    numeric: NumericOptions | None = Field(
        default=None, description="the dense-feature encoding of every pool model and baseline alike (the fused "
        "model follows its pool); None = as each pool entry says (minmax unless set)")
    jobs_from: str | None = Field(
        default=None, description="another profile whose job store (<out>/<dataset>/raw/<that profile>/) this one "
        "runs in: its finished pools, fused models and baselines are reused wherever a job's inputs are the "
        "same (the job signatures decide), so a profile of extra recipes trains only what is new")

    @field_validator("baselines", "task_set_methods")
    @classmethod
    def _known_baselines(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in BASELINE_NAMES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; known: {list(BASELINE_NAMES)}")
        return names


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
            raise EMMError(f"benchmark profile {name!r} is not in params.yaml; known: {sorted(self.profiles)}")
        return self.profiles[name]


class PipelineConfig(Options):
    """What `dvc repro` and the Prefect flow run on."""

    dataset: str = "census-income"


class Params(Options):
    """The whole params.yaml; an unknown section or key anywhere is an error."""

    paths: PathsConfig = PathsConfig()
    ingest: IngestConfig = IngestConfig()
    pretrain: PretrainConfig = PretrainConfig()
    decompose: DecomposeConfig = DecomposeConfig()
    fuse: FuseConfig = FuseConfig()
    tracking: TrackingConfig = TrackingConfig()
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict, description="user dataset declarations")
    pipeline: PipelineConfig = PipelineConfig()
    scale: ScaleConfig = ScaleConfig()
    synth: SynthConfig = SynthConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()


def load_params(path: Path | str | None = None) -> Params:
    """Load params.yaml; a missing default file means 'all defaults', a missing named file is an error."""
    if path is None:
        path = DEFAULT_PARAMS_FILE
        if not path.exists():
            return Params()
    path = Path(path)
    if not path.exists():
        raise EMMError(f"params file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise EMMError(f"params file {path} is not valid YAML: {exc}") from exc
    for name, decl in (raw.get("datasets") or {}).items():
        decl.setdefault("name", name)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise EMMError(f"params file {path} is invalid:\n{exc}") from exc
