"""What the fusion library takes: decomposition settings, the AKF options (the architecture), the fuse options
(the architecture and how it is trained: ``FuseOptions``, which ``emm.fusion.procedure`` turns into a plan), and
the ablation table.

Why the ablations are one table: Table II's variants are named in the config, built by the fused
model, ordered by the benchmark and labelled by its report. Each reads this table, so adding or
renaming a variant is one edit.

Why the recipe options (``output``, ``embedding``, ``fusion_gate``, ``attention``) list no values here: the
recipe registries (``emm.fusion.recipes``) are their one declaration. A field accepts exactly the registry's
keys, checked when a config is validated, so a recipe registered later (a plugin, a test) is accepted too;
the error message and the JSON schema are a ``Literal``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from emm.fusion.recipes import ATTENTIONS, ENTRIES, FUSION_GATES, OUTPUTS, Registry
from emm.options import Options
from emm.train.options import TrainConfig


@dataclass(frozen=True)
class Ablation:
    """One Table II variant: are the components the pool's trained ones (frozen), and is MTM on?"""

    name: str
    pretrained: bool
    mtm: bool
    label: str


ABLATIONS: dict[str, Ablation] = {a.name: a for a in (
    Ablation("baseline", pretrained=False, mtm=False, label="baseline"),
    Ablation("+mtm", pretrained=False, mtm=True, label="baseline+MTM"),
    Ablation("+pretrained", pretrained=True, mtm=False, label="baseline+p (trained components)"),
    Ablation("full", pretrained=True, mtm=True, label="EMM (fused)"),
)}
AblationName = Literal[tuple(ABLATIONS)]  # type: ignore[valid-type]  # built from the table above


class RegistryKey:
    """Pydantic marker for a ``str`` field whose allowed values are a recipe registry's keys (see the module
    docstring): ``Annotated[str, RegistryKey(REGISTRY)]``."""

    def __init__(self, registry: Registry[Any]) -> None:
        self.registry = registry

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self._check)

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"enum": list(self.registry), "type": "string"}

    def _check(self, value: Any) -> str:
        if isinstance(value, str) and value in self.registry:
            return value
        keys = [repr(k) for k in self.registry]
        expected = " or ".join([", ".join(keys[:-1]), keys[-1]] if len(keys) > 1 else keys)
        raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


OutputName = Annotated[str, RegistryKey(OUTPUTS)]
EmbeddingName = Annotated[str, RegistryKey(ENTRIES)]
GateName = Annotated[str, RegistryKey(FUSION_GATES)]
AttentionName = Annotated[str, RegistryKey(ATTENTIONS)]


class DecomposeConfig(Options):
    """Algorithm 1 settings."""

    align: Literal["identical", "project"] = Field(
        default="identical", description="identical = the paper; project = cut at equal relative depth + adapters"
    )
    levels: int | None = Field(default=None, description="project only: number of levels (default: the fewest cuts)")
    head: str | None = Field(default="tower", description="sub-module never cut into: each model's head")
    example_rows: int = Field(default=256, gt=0, description="rows of the batch used to trace shapes")


class AKFOptions(Options):
    """The fused model's architecture: all that ``fused.json`` records about how it was built.

    See emm/fusion/recipes/ for what each recipe option does and ``ABLATIONS`` above for the ablations.
    Training settings are not here on purpose: the same architecture trained differently is the same model class.
    """

    embedding: EmbeddingName = Field(
        default="retrain", description="retrain = the paper (a fresh shared embedding); reuse = the pool's own, frozen"
    )
    fusion_gate: GateName = Field(
        default="scaled", description="hard = paper argmax (no gradient); scaled/ste give the gate a gradient"
    )
    attention: AttentionName = "task_query"
    ablation: AblationName = Field(default="full", description="Table II variant: baseline = random trainable "
                                   "components, no MTM; +mtm adds MTM; +pretrained = trained frozen components, "
                                   "no MTM; full = EMM")
    qkv_dim: int | None = Field(default=None, description="Q/K width (default: the level's width)")
    tower: list[int] = Field(default_factory=lambda: [8])
    output: OutputName = Field(
        default="tower", description="tower = the paper (a fresh tower per task on the last level); "
        "donor_residual = each task's frozen donors whole, blended, plus the AKF towers as a residual that "
        "starts at zero (emm/fusion/blend.py); cross_residual = the same, but every donor's logit may enter every "
        "task's blend (the cross-task stack, for a task with scarce labels)")


class FuseOptions(AKFOptions):
    """The fuse procedure: the fused model's architecture (``AKFOptions``, what ``fused.json`` records) and how it
    is trained. ``FusePlan.from_options`` (``emm.fusion.procedure``) reads the training switches once, into the
    plan's phases and target; the pipeline's ``fuse`` section of params.yaml is this class."""

    blend_init: Literal["mean", "stack"] = Field(
        default="stack", description="output donor_residual/cross_residual only: the donors' blend starts as "
        "their mean, or as a logistic regression fitted on their labelled validation logits (the donor stack)")
    finetune_lr_scale: float | None = Field(
        default=None, gt=0, le=1, description="after the first early stop (the gates have converged), unfreeze "
        "the pool's components and donors and train on at lr x this, early-stopped again with the first phase's "
        "best as a candidate; None = frozen throughout (the paper)")
    distill: float = Field(
        default=0.0, ge=0, lt=1, description="knowledge distillation from the pool's donor ensemble (the mean of "
        "each task's donor logits): the training targets are (1 - distill) x label + distill x the ensemble's "
        "probability (emm/train/distill.py); 0 = the labels alone (the paper)")
    keep_start_per_task: bool = Field(
        default=True, description="output donor_residual/cross_residual, one training phase: after early "
        "stopping, a task whose validation AUC was no better at the kept epoch than at step 0 (its donors' blend) "
        "goes back to that blend, its residual switched off (emm/fusion/procedure/runner.py); false = every task "
        "takes the kept epoch")
    start_patience: int | None = Field(
        default=None, ge=1, description="for a fit that scores its start (output donor_residual/cross_residual, and "
        "every fine-tune phase): stop after this many epochs when no task's validation AUC rose above its step-0 "
        "value by more than train.min_delta, since fusion cannot win there (emm/train/stopping.py); None = "
        "train.patience alone")
    train: TrainConfig = TrainConfig()

    @property
    def akf(self) -> AKFOptions:
        """The architecture half alone: what the fused model is built from."""
        return AKFOptions.model_validate(self.model_dump(include=set(AKFOptions.model_fields)))
