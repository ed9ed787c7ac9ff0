"""params.yaml: one strict settings section per stage, shared by the CLI, ``dvc repro`` and the Prefect flow.

Why one file: DVC tracks exactly the sections a stage reads (``params:`` in dvc.yaml) and Prefect passes
the same file to the same stage functions, so a setting has one home and one meaning. The sections the
library takes are declared beside the code that reads them (``emm.data.options``, ``emm.train.options``,
``emm.fusion.options``); this module assembles them and adds what only the pipeline knows (folders,
pool lists, tracking). Unknown keys are errors.

The paper's experiments (``emm benchmark``, ``emm relatedness``) are no stage: their settings live with the
harness that runs them (harness/benchmark.yaml), and a params file that still carries their section is
refused with a message that says so (``MOVED_SECTIONS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from emm.data.options import IngestConfig, ScaleConfig, SynthConfig
from emm.data.spec import DatasetSpec
from emm.errors import EMMError
from emm.io import read_yaml
from emm.fusion.options import DecomposeConfig, FuseOptions
from emm.models.embedding import NumericOptions
from emm.options import Options
from emm.train.compact import CompactOptions
from emm.train.options import TrainConfig

DEFAULT_PARAMS_FILE = Path("params.yaml")
# sections that left params.yaml, and where they went: a file that still has one is told, not just refused
MOVED_SECTIONS = {"benchmark": "moved to the paper harness's own file, harness/benchmark.yaml: remove it here, "
                               "and pass your own settings to `emm benchmark` / `emm relatedness` as a file of that "
                               "shape with --config"}
__all__ = ["CompressConfig", "DecomposeConfig", "FuseConfig", "IngestConfig", "MOVED_SECTIONS", "Params", "PathsConfig", "PretrainConfig",
           "ScaleConfig", "SynthConfig", "TrackingConfig", "TrainConfig", "load_params"]


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
        "(emm.models.ModelSpec, trained here; arch: lightgbm is emm.models.trees.LightGBMSpec), MLflow {name, task, "
        "uri, inputs, output, trust_pickle}, factory {name, task, factory, kwargs, weights, inputs, output} or a tree "
        "file {name, task, lightgbm: model.txt | xgboost: model.json, sha256} (emm.models.external, imported, never "
        "trained); checked by emm.pipeline.pool_specs.pool_specs; default: two built-in models per task",
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


class CompressConfig(CompactOptions):
    """The compress stage's section: the library's ``CompactOptions`` (the FLOPs budget, the shape, the training)
    and the gate a compact model must pass to be registered (``emm.pipeline.compress``)."""

    enabled: bool = Field(default=True, description="false: the stage writes only a note that it was skipped")
    max_auc_loss: float = Field(default=0.0002, ge=0, description="register the compact model (alias fast) only "
                                "when its test AUC minus the fused model's is at least -max_auc_loss on every task")


class TrackingConfig(Options):
    """MLflow: a local SQLite store under mlruns/ unless MLFLOW_TRACKING_URI says otherwise."""

    store: Path = Path("mlruns")
    log_models: bool = True


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
    compress: CompressConfig = CompressConfig()
    tracking: TrackingConfig = TrackingConfig()
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict, description="user dataset declarations")
    pipeline: PipelineConfig = PipelineConfig()
    scale: ScaleConfig = ScaleConfig()
    synth: SynthConfig = SynthConfig()


def load_params(path: Path | str | None = None) -> Params:
    """Load params.yaml; a missing default file means 'all defaults', a missing named file is an error."""
    if path is None:
        path = DEFAULT_PARAMS_FILE
        if not path.exists():
            return Params()
    path = Path(path)
    if not path.exists():
        raise EMMError(f"params file {path} does not exist")
    raw = read_yaml(path, "params file")
    moved = next((k for k in raw if k in MOVED_SECTIONS), None) if isinstance(raw, dict) else None
    if moved:
        raise EMMError(f"params file {path}: its `{moved}:` section {MOVED_SECTIONS[moved]}")
    for name, decl in (raw.get("datasets") or {}).items():
        decl.setdefault("name", name)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise EMMError(f"params file {path} is invalid:\n{exc}") from exc
