"""Optimisation settings every trained model shares."""

from __future__ import annotations


from pydantic import Field

from emm.options import Options


class TrainConfig(Options):
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
