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
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
