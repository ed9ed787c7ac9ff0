"""Settings: one pydantic model per stage, all loaded from one ``params.yaml``.

Why one file: DVC tracks exactly the sections a stage reads (``params:`` in dvc.yaml) and Prefect
passes the same file to the same stage functions, so a setting has one home and one meaning.
Unknown keys are errors (``extra="forbid"``): a typo in params.yaml must not silently fall back
to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from emm.data.spec import DatasetSpec
from emm.errors import EMMError

DEFAULT_PARAMS_FILE = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathsConfig(_Section):
    """Where raw data, stage artifacts and the MLflow store live (relative to the working directory)."""

    raw_root: Path = Path("data")
    artifacts: Path = Path("artifacts")


class IngestConfig(_Section):
    """Raw files -> Parquet splits."""

    seed: int = 2026
    block_mb: int = Field(default=32, gt=0, description="CSV bytes parsed per chunk: bounds peak memory")
    tasks: dict[str, list[str]] = Field(
        default_factory=dict, description="dataset -> tasks to build (default: the declaration's default_tasks)"
    )
    leakage_auc: float = Field(
        default=0.999, description="refuse a feature whose values alone reach this AUC on a task (a leaked label)"
    )
    leakage_min_class_rows: int = Field(default=50, description="run the leakage audit only with this many rows per class")


class TrainConfig(_Section):
    """Optimisation settings shared by every trained model (paper IV-C: Census 1e-3 / 1e-6 / 1024)."""

    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-6, ge=0)
    batch_size: int = Field(default=1024, gt=0)
    eval_batch_size: int = Field(default=65536, gt=0)
    max_epochs: int = Field(default=30, gt=0)
    patience: int = Field(default=3, gt=0, description="epochs without val-AUC gain before stopping")
    min_delta: float = Field(default=1e-5, ge=0)
    seed: int = 2026
    device: str = Field(default="auto", description="auto = CUDA when present, else CPU")


class PretrainConfig(_Section):
    """The single-task model pool: which models, trained how."""

    train: TrainConfig = TrainConfig()
    pool: dict[str, list[dict[str, Any]]] = Field(
        default_factory=dict,
        description="dataset -> list of model specs (emm.models.ModelSpec fields); default: DEFAULT_POOL",
    )


class DecomposeConfig(_Section):
    """Algorithm 1 settings."""

    align: Literal["identical", "project"] = Field(
        default="identical", description="identical = the paper; project = cut at equal relative depth + adapters"
    )
    levels: int | None = Field(default=None, description="project only: number of levels (default: the fewest cuts)")
    head: str | None = Field(default="tower", description="sub-module never cut into: each model's head")
    example_rows: int = Field(default=256, gt=0, description="rows of the batch used to trace shapes")


class FuseConfig(_Section):
    """The fused (AKF) model and its training. See emm/fusion/akf.py for what each switch does."""

    embedding: Literal["retrain", "reuse"] = Field(
        default="retrain", description="retrain = the paper (a fresh shared embedding); reuse = the pool's own, frozen"
    )
    fusion_gate: Literal["hard", "scaled", "ste"] = Field(
        default="scaled", description="hard = paper argmax (no gradient); scaled/ste give the gate a gradient"
    )
    attention: Literal["task_query", "self_score"] = "task_query"
    ablation: Literal["full", "baseline", "+mtm", "+pretrained"] = Field(
        default="full", description="Table II: baseline = random trainable components, no MTM; +mtm; +pretrained "
        "= trained frozen components, no MTM; full = EMM"
    )
    qkv_dim: int | None = Field(default=None, description="Q/K width (default: the level's width)")
    tower: list[int] = Field(default_factory=lambda: [8])
    vectorize: bool = True
    train: TrainConfig = TrainConfig()


class TrackingConfig(_Section):
    """MLflow: a local SQLite store under mlruns/ unless MLFLOW_TRACKING_URI says otherwise."""

    store: Path = Path("mlruns")
    log_models: bool = True


BASELINE_NAMES = ("shared_bottom", "mmoe", "ple", "aitm", "adatt")
ABLATIONS = ("baseline", "+mtm", "+pretrained", "full")


class BenchmarkProfile(_Section):
    """How much of the benchmark to run. Every model in one profile gets the same budget: the pool and
    the baselines train with ``pretrain.train``, the fused variants with ``fuse.train``, each with the
    run's seed and (optionally) a smaller epoch cap."""

    seeds: list[int] = Field(default_factory=lambda: [2026, 2027, 2028], min_length=1)
    raw_rows: int | None = Field(default=None, gt=0, description="first N rows of each raw file (None = all)")
    max_epochs: int | None = Field(default=None, gt=0, description="cap on every model's epochs (None = as trained)")
    baselines: list[str] = Field(default_factory=lambda: list(BASELINE_NAMES))
    ablations: list[Literal["baseline", "+mtm", "+pretrained", "full"]] = Field(
        default_factory=lambda: list(ABLATIONS), description="Table II rows; `full` is EMM itself (always run)")
    lightgbm: bool = True
    task_sets: dict[str, list[list[str]]] = Field(
        default_factory=dict, description="dataset -> extra task lists for the Figure 3 runs")
    task_set_methods: list[str] = Field(
        default_factory=lambda: ["mmoe", "ple", "aitm", "adatt"],
        description="baselines run beside the pool and EMM on the extra task sets")
    task_set_seeds: int = Field(default=1, gt=0, description="how many of `seeds` the extra task sets use")

    @field_validator("baselines", "task_set_methods")
    @classmethod
    def _known_baselines(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in BASELINE_NAMES]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; known: {list(BASELINE_NAMES)}")
        return names


class BenchmarkConfig(_Section):
    """`emm benchmark`: Table I, Table II and Figure 3 (issue 6)."""

    out: Path = Field(default=Path("results"), description="results/<dataset>/ tables, plots, per-run json")
    workers: int = Field(default=2, gt=0, description="training processes in parallel, one torch thread each")
    profile: str = "full"
    profiles: dict[str, BenchmarkProfile] = Field(default_factory=lambda: {"full": BenchmarkProfile()})
    baseline_size: dict[str, dict[str, list[int]]] = Field(
        default_factory=dict,
        description="dataset -> {expert_hidden, tower}; default paper IV-C: Census [16]/[8], others [128]/[128]")

    def pick(self, name: str | None) -> BenchmarkProfile:
        name = name or self.profile
        if name not in self.profiles:
            raise EMMError(f"benchmark profile {name!r} is not in params.yaml; known: {sorted(self.profiles)}")
        return self.profiles[name]


class ScaleConfig(_Section):
    """Past one machine: DDP under torchrun, and streaming a training split too large for memory.

    DDP switches on by itself when the process was launched by ``torchrun`` with WORLD_SIZE > 1 (the
    launch *is* the request); ``train.batch_size`` stays the *global* batch, split evenly across ranks,
    so a run on N ranks takes the same optimisation steps as a single process.
    """

    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="auto = nccl when CUDA is present, else gloo")
    timeout_s: int = Field(default=1800, gt=0, description="a rank waiting this long on the others fails the run")
    stream: Literal["auto", "always", "never"] = Field(
        default="auto", description="auto = stream train/val/test when the train split has more than stream_above_rows rows")
    stream_above_rows: int = Field(default=5_000_000, gt=0,
                                   description="in-memory cost is ~(8*n_sparse + 4*n_dense) bytes per row, plus "
                                   "conversion copies; above this, stream")
    buffer_rows: int = Field(default=262_144, gt=0, description="shuffle buffer of the stream: bounds its memory")


class SynthConfig(_Section):
    """``emm synth``: a synthetic table in the AliExpress layout with planted task relations.

    Generative story (see emm/data/synth.py): a shared latent (intent) drives both tasks; click also has
    its own features; conversion is only possible after a click and has its own features too.
    """

    dataset: str = Field(default="aliexpress-synth", description="name recorded in schema.json")
    rows: int = Field(default=1_000_000, gt=0, description="total rows over train+val+test")
    seed: int = 2026
    val_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    row_group_rows: int = Field(default=131_072, gt=0, description="rows generated and written at a time: "
                                "bounds the generator's memory, and is the Parquet row-group size streaming reads")
    vocab_sizes: list[int] = Field(default_factory=lambda: [10, 100, 1000, 10000],
                                   description="cycled over categorical_1..16 (real AliExpress ranges 3 to ~100k)")
    zipf_exponent: float = Field(default=1.1, gt=0, description="category frequencies ~ rank^-s, as in real logs")
    dense_levels: int = Field(default=256, gt=1, description="dense values quantised to this many levels in [0, 1]")
    shared_features: int = Field(default=4, ge=1, description="categorical and 4x as many dense features driving the shared latent")
    specific_features: int = Field(default=4, ge=1, description="categorical (and 4x dense) features per task of its own")
    click_rate: float = Field(default=0.2, gt=0, lt=1, description="target base click rate")
    conversion_given_click: float = Field(default=0.2, gt=0, lt=1, description="target P(conversion | click)")
    signal: float = Field(default=1.0, gt=0, description="std of each task's logit from features; higher = easier")
    shared_weight: float = Field(default=0.7, ge=0, le=1, description="share of conversion's signal from the "
                                 "shared latent (the rest from its own features)")


class PipelineConfig(_Section):
    """What `dvc repro` and the Prefect flow run on."""

    dataset: str = "census-income"


class Params(_Section):
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


def params_hash(section: BaseModel | dict[str, Any]) -> str:
    """Stable short hash of a config section, recorded in every artifact it produced."""
    data = section.model_dump(mode="json") if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
