"""What counts as a layer, and the rules both model readers share.

Layers are leaf modules that own parameters (Linear, Embedding, BatchNorm, Conv, ...); their
*structural signature* is the module type, its constructor hyper-parameters (``extra_repr``) and
the input/output shapes seen on the example batch (batch dimension dropped). Normalisation layers
(BatchNorm, LayerNorm, GroupNorm, ...) are signed but never cut after: they belong to the block of
the layer before them, like the paper's Linear+BN+ReLU+Dropout blocks. The torch.fx reader and the
forward-hook reader apply exactly these rules, so a model reads the same way whichever one succeeds.
"""

from __future__ import annotations

from torch import nn

from emm.models.embedding import PeriodicNumeric

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

# torch's own parametric layers: the fx reader never traces into them, subclasses included (a faster
# Embedding is still an Embedding for alignment)
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
    PeriodicNumeric,  # EMM's numeric encoder: one layer (its standardisation and PLR parts never split)
)


class Untraceable(Exception):
    """A reader cannot describe the model faithfully; ``where`` names the part that defeated it.

    Readers raise it rather than ``EMMError`` so the caller can try the next reader and, if all
    fail, name every reason in one user-facing error.
    """

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


def has_params(module: nn.Module) -> bool:
    """Whether the module owns (or contains) a parameter: only such leaves are layers."""
    return next(module.parameters(), None) is not None


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def hparams(module: nn.Module) -> str:
    """Constructor hyper-parameters as torch prints them; parameter shapes for modules that print none."""
    text = module.extra_repr()
    if text:
        return text
    return ", ".join(f"{n}={tuple(p.shape)}" for n, p in module.named_parameters())


def no_cut_reason(module: nn.Module, is_last: bool) -> str | None:
    """Why no cut may follow this layer regardless of dataflow, or None if the reader should look.

    The last cut-able layer is never cut after, so every head keeps at least one layer.
    """
    if is_norm(module):
        return "normalisation layer: stays with the layer before it"
    if is_last:
        return "last layer: belongs to the head"
    return None
