"""What models exist? Embeddings, single-task bodies and the pool file, and the multi-task baselines (``baselines``)."""

from emm.models.single_task import ModelSpec, SingleTaskModel, build_model

__all__ = ["ModelSpec", "SingleTaskModel", "build_model"]
