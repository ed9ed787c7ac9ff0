"""How is any model trained and scored? One trainer, sklearn metrics.

The names below are loaded on first use (PEP 562), not when the package is: importing any ``emm.train``
module runs this file first, and an eager ``metrics`` import would load scikit-learn (and SciPy) into every
process that only scores, ``emm predict`` among them, for metrics it never computes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emm.lazy import lazy_getattr

if TYPE_CHECKING:
    from emm.train.metrics import auc, mean_auc, task_metrics
    from emm.train.predict import predict_proba
    from emm.train.trainer import FitResult, Trainer, pick_device

# exported name -> the module that defines it
_EXPORTS = {
    "FitResult": "emm.train.trainer",
    "Trainer": "emm.train.trainer",
    "pick_device": "emm.train.trainer",
    "auc": "emm.train.metrics",
    "mean_auc": "emm.train.metrics",
    "task_metrics": "emm.train.metrics",
    "predict_proba": "emm.train.predict",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS)
