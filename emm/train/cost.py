"""What a model costs to run: FLOPs per row and parameter counts, measured rather than estimated.

Why torch's own flop counter rather than arithmetic over layer sizes: the fused model is wired from
recipe parts whose cost depends on what is kept (pruned residuals, shared level-0 work), and only a
count taken on a real forward pass follows those choices without a second description of the model
that could drift from it. The counter sees matmuls and convolutions (the work that dominates these
models); embedding lookups and element-wise ops count as zero, so the number is a floor on arithmetic,
the same floor for every model compared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from emm.errors import EMMError
from emm.train.modes import eval_mode


@dataclass(frozen=True)
class ModelCost:
    """``flops_per_row``: multiply-adds x 2 per scored row (torch's counter, eval mode, no grad);
    ``parameters``: every parameter, frozen or not; ``trainable``: those with ``requires_grad``."""

    flops_per_row: int
    parameters: int
    trainable: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters); a parameter shared by two sub-modules counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_cost(model: nn.Module, sparse: torch.Tensor, dense: torch.Tensor) -> ModelCost:
    """Count one forward pass of ``model(sparse, dense)`` on the given rows and divide by their number.

    The rows should be real (the data's own indices): a model whose work depends on the input (a
    gate that skips a branch) is then counted as it runs."""
    rows = int(sparse.shape[0])
    if rows == 0 or int(dense.shape[0]) != rows:
        raise EMMError(f"model_cost needs a batch of at least one row with as many sparse as dense rows "
                       f"(got {tuple(sparse.shape)} and {tuple(dense.shape)})")
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(sparse, dense)
    total, trainable = parameter_counts(model)
    return ModelCost(flops_per_row=round(counter.get_total_flops() / rows), parameters=total, trainable=trainable)
