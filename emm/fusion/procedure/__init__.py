"""The fuse procedure: a plan (the architecture, the ordered training phases, the target) apart from the runner
that executes it with the Trainer. ``FusePlan.from_options(options)`` reads the fuse options once;
``FuseRunner(plan, ...)`` builds, prepares and trains; every caller that fuses goes through both."""

from emm.fusion.procedure.plan import Distill, FineTune, Frozen, FusePlan, Labels, Phase, Target
from emm.fusion.procedure.runner import FuseFit, FuseRunner, chain

__all__ = ["Distill", "FineTune", "Frozen", "FuseFit", "FusePlan", "FuseRunner", "Labels", "Phase", "Target", "chain"]
