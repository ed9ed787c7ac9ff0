"""What models exist? The single-task pool (and, later, the multi-task baselines)."""

from emm.models.single_task import ModelSpec, SingleTaskModel, build_model

__all__ = ["ModelSpec", "SingleTaskModel", "build_model"]
