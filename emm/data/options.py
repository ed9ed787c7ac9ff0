"""Options the data layer takes: ingestion, streaming/scale, the synthetic generator."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from emm.options import Options


LabelFraction = Annotated[float, Field(gt=0, le=1)]


class IngestConfig(Options):
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
    label_fraction: dict[str, LabelFraction] = Field(
        default_factory=dict, description="task -> share of train and val rows that keep its label (0 < f <= 1; "
        "the others get none: the scarce-task setting). Test keeps every label. The kept rows are a per-row hash "
        "of (seed, task, split, row), so smaller fractions keep subsets of larger ones (emm.data.labels)"
    )


class ScaleConfig(Options):
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


class SynthConfig(Options):
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
    label_fraction: dict[str, LabelFraction] = Field(
        default_factory=dict, description="task (click/conversion) -> share of train and val rows that keep its "
        "label, as ingest.label_fraction; test keeps every label")
