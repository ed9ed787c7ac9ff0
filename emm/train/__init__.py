"""How is any model trained and scored? One trainer, sklearn metrics."""

from emm.train.metrics import auc, mean_auc, task_metrics
from emm.train.predict import predict_proba
from emm.train.trainer import FitResult, Trainer, pick_device

__all__ = ["FitResult", "Trainer", "auc", "mean_auc", "pick_device", "predict_proba", "task_metrics"]
