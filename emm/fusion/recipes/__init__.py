"""Fusion recipes: the parts a fused model is wired from, one registry per ``AKFOptions`` option.

- ``output``: ``OutputHead`` (``tower``, ``donor_residual``, ``cross_residual``), the fused model's logits on top
  of its towers.
- ``embedding``: ``Level0Entry`` (``retrain``, ``reuse``), what the first AKF level receives.
- ``fusion_gate``: ``FusionGate`` (``hard``, ``scaled``, ``ste``), how ``AKFLevel`` mixes in the selected task.
- ``attention``: ``Attention`` (``task_query``, ``self_score``), how ``MultiTaskMerge`` forms its queries.

A registry is the one declaration of an option's allowed values (``AKFOptions`` validates against its keys).
A new recipe is a subclass of the base plus ``@REGISTRY.register("name")``; ``fusion_gate: name`` in
params.yaml then builds it (once its module is imported). The Table II ablations stay a data table
(``emm.fusion.options.ABLATIONS``).
"""

from emm.fusion.recipes.attention import ATTENTIONS, Attention, SelfScore, TaskQuery
from emm.fusion.recipes.base import Recipe, Registry
from emm.fusion.recipes.entry import ENTRIES, Level0Entry, RetrainEmbedding, ReuseEmbedding
from emm.fusion.recipes.gate import FUSION_GATES, FusionGate, HardGate, ScaledGate, StraightThroughGate
from emm.fusion.recipes.output import OUTPUTS, CrossResidualOutput, DonorResidualOutput, OutputHead, TowerOutput

__all__ = [
    "ATTENTIONS",
    "Attention",
    "CrossResidualOutput",
    "DonorResidualOutput",
    "ENTRIES",
    "FUSION_GATES",
    "FusionGate",
    "HardGate",
    "Level0Entry",
    "OUTPUTS",
    "OutputHead",
    "Recipe",
    "Registry",
    "RetrainEmbedding",
    "ReuseEmbedding",
    "ScaledGate",
    "SelfScore",
    "StraightThroughGate",
    "TaskQuery",
    "TowerOutput",
]
