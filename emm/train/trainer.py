"""The one trainer every stage uses: single-task pool, baselines and the fused model.

Design choices, and why:
- Whole splits live as tensors; a batch is an index slice of a shuffled permutation. No per-row Python,
  no dict per sample: this is what makes two CPU cores enough (see benchmarks/train_throughput.py).
- Multi-task from day one: the model returns ``[B, T]`` logits, the loss is the sum of the T binary
  cross-entropies, early stopping watches the mean validation AUC over tasks.
- Exact resume: the shuffle of epoch ``e`` comes from a generator seeded with ``seed + e``, and the
  checkpoint written after every epoch holds the model, the optimizer, torch's RNG state (dropout) and
  the early-stopping state. Killing after epoch k and resuming gives the same weights bit for bit.
- Checkpoints are plain dicts of tensors and numbers, saved with ``torch.save`` and loaded with
  ``weights_only=True`` (no pickle of code).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from emm.config import TrainConfig
from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.train.metrics import mean_auc, task_metrics

log = logging.getLogger(__name__)
CHECKPOINT = "last.pt"
EpochCallback = Callable[[int, dict[str, float]], None]


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise EMMError(f"device {preference!r} was asked for but CUDA is not available on this machine")
    return torch.device(preference)


@dataclass
class FitResult:
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Adam + BCE, early stopping on mean validation AUC, best weights kept, a checkpoint per epoch."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, checkpoint_dir: Path | None = None,
                 fingerprint: str | None = None, on_epoch: EpochCallback | None = None,
                 progress: bool = True, desc: str = "train") -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.model = model.to(self.device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.fingerprint = fingerprint
        self.on_epoch = on_epoch
        self.progress = progress
        self.desc = desc
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise EMMError(f"{desc}: the model has no trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.loss_fn = nn.BCEWithLogitsLoss()

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, train: SplitTensors, val: SplitTensors, *, resume: bool = False) -> FitResult:
        cfg = self.cfg
        if len(train) == 0 or len(val) == 0:
            raise EMMError(f"{self.desc}: empty training or validation split")
        self._check_output_width(train)
        torch.manual_seed(cfg.seed)
        state = {"epoch": 0, "best_auc": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
        best_state = copy.deepcopy(self.model.state_dict())
        if resume:
            loaded = self._load_checkpoint()
            if loaded is not None:
                state, best_state = loaded
                log.info("%s: resumed after epoch %d", self.desc, state["epoch"])
        train_dev = train.to(self.device)
        started = time.perf_counter()
        stopped_early = state["bad_epochs"] >= cfg.patience
        while state["epoch"] < cfg.max_epochs and not stopped_early:
            epoch = state["epoch"] + 1
            train_loss = self._run_epoch(train_dev, epoch)
            metrics = self.evaluate(val)
            val_auc = mean_auc(metrics)
            row = {"epoch": epoch, "train_loss": train_loss, "val_auc": val_auc,
                   **{f"val_auc_{t}": m["auc"] for t, m in metrics.items()},
                   **{f"val_logloss_{t}": m["logloss"] for t, m in metrics.items()}}
            state["history"].append(row)
            if val_auc > state["best_auc"] + cfg.min_delta:
                state.update(best_auc=val_auc, best_epoch=epoch, bad_epochs=0)
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            stopped_early = state["bad_epochs"] >= cfg.patience
            self._save_checkpoint(state, best_state)
            if self.on_epoch:
                self.on_epoch(epoch, row)
            log.info("%s epoch %d: loss %.5f val AUC %.5f%s", self.desc, epoch, train_loss, val_auc,
                     " (best)" if state["best_epoch"] == epoch else "")
        self.model.load_state_dict(best_state)
        return FitResult(best_epoch=state["best_epoch"], best_val_auc=state["best_auc"], epochs_run=state["epoch"],
                         stopped_early=stopped_early, seconds=time.perf_counter() - started,
                         history=state["history"])

    @torch.no_grad()
    def _check_output_width(self, data: SplitTensors) -> None:
        was_training = self.model.training
        self.model.eval()
        out = self.model(data.sparse[:2].to(self.device), data.dense[:2].to(self.device))
        self.model.train(was_training)
        if out.shape[1:] != data.labels.shape[1:]:
            raise EMMError(f"{self.desc}: the model returns {out.shape[1]} output(s) per row but the data has "
                           f"{data.labels.shape[1]} task(s) {data.task_names}; select the model's task(s) first")

    def _run_epoch(self, data: SplitTensors, epoch: int) -> float:
        self.model.train()
        n, bs = len(data), self.cfg.batch_size
        gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
        order = torch.randperm(n, generator=gen).to(self.device)
        total, seen = torch.zeros((), device=self.device), 0
        steps = range(0, n, bs)
        bar = tqdm(steps, desc=f"{self.desc} epoch {epoch}", leave=False, disable=not self.progress,
                   mininterval=1.0)
        for step, start in enumerate(bar):
            idx = order[start:start + bs]
            logits = self.model(data.sparse[idx], data.dense[idx])
            loss = self.loss_fn(logits, data.labels[idx]) * data.labels.shape[1]  # sum over tasks
            if not torch.isfinite(loss):
                where = f"epoch {epoch}, step {step}"
                kept = (f"the last good checkpoint (after epoch {epoch - 1}) is kept in {self.checkpoint_dir}"
                        if self.checkpoint_dir else "no checkpoint directory was set")
                raise EMMError(f"{self.desc}: the training loss became {loss.item()} at {where}; {kept}. "
                               f"Lower the learning rate or check the input data for extreme values.")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
            if self.progress and step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        return float(total) / seen

    # ---- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, data: SplitTensors) -> np.ndarray:
        return predict_proba(self.model, data, self.cfg.eval_batch_size, self.device)

    def evaluate(self, data: SplitTensors) -> dict[str, dict[str, float]]:
        return task_metrics(data.labels.numpy(), self.predict(data), data.task_names)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _save_checkpoint(self, state: dict[str, Any], best_state: dict[str, torch.Tensor]) -> None:
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "best_model": best_state,
            "state": state, "torch_rng": torch.get_rng_state(), "fingerprint": self.fingerprint or "",
        }
        tmp = self.checkpoint_dir / f".{CHECKPOINT}.tmp"
        torch.save(payload, tmp)
        tmp.replace(self.checkpoint_dir / CHECKPOINT)  # atomic: a kill mid-save keeps the previous epoch

    def _load_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        path = (self.checkpoint_dir or Path("/nonexistent")) / CHECKPOINT
        if not path.exists():
            log.info("%s: no checkpoint at %s, starting fresh", self.desc, path)
            return None
        payload = torch.load(path, map_location=self.device, weights_only=True)
        if self.fingerprint and payload.get("fingerprint") not in ("", self.fingerprint):
            raise EMMError(f"{path} was written for data schema {payload['fingerprint']}, but the data now has "
                           f"schema {self.fingerprint}; delete the checkpoint or re-ingest the matching data")
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise EMMError(f"{path} does not fit this model's architecture: {str(exc).splitlines()[0]}. "
                           f"Delete it to start fresh.") from exc
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        return payload["state"], payload["best_model"]


@torch.no_grad()
def predict_proba(model: nn.Module, data: SplitTensors, batch_size: int = 65536,
                  device: torch.device | None = None) -> np.ndarray:
    """Sigmoid probabilities [N, T], in eval mode, batch by batch."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        logits = model(data.sparse[sl].to(device), data.dense[sl].to(device))
        out.append(torch.sigmoid(logits).float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, data.labels.shape[1]), np.float32)
