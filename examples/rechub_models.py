"""The worked example's model factory: torch-rechub ranking models built for an ingested EMM dataset.

A pool entry names it as ``factory: rechub_models:build`` (this folder on PYTHONPATH) with ``kwargs`` that
are plain YAML; ``build`` reads the feature list from the ingested ``schema.json``, so the embedding
tables have exactly the data's vocabulary sizes (torch-rechub's dict convention: local indices, 0 = unseen).
"""

from __future__ import annotations

from torch import nn
from torch_rechub.basic.features import DenseFeature, SparseFeature
from torch_rechub.models.ranking import DCN, DCNv2

from emm.data.batches import feature_table


def build(kind: str, data_dir: str, embed_dim: int = 8, dims: list[int] | None = None, cross_layers: int = 2,
          dropout: float = 0.1) -> nn.Module:
    """``kind``: ``dcn`` (cross network beside an MLP) or ``dcnv2`` (cross network, then an MLP: stacked)."""
    table = feature_table(data_dir)
    features = [SparseFeature(name, vocab, embed_dim) for name, vocab in table["sparse"]]
    features += [DenseFeature(name) for name in table["dense"]]
    mlp = {"dims": list(dims or [128, 64, 16]), "dropout": dropout}
    if kind == "dcn":
        return DCN(features, cross_layers, mlp)
    if kind == "dcnv2":
        return DCNv2(features, cross_layers, mlp, model_structure="stacked", use_low_rank_mixture=False)
    raise ValueError(f"kind must be 'dcn' or 'dcnv2', got {kind!r}")
