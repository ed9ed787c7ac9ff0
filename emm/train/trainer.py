"""The one trainer every stage uses: single-task pool, baselines and the fused model.

Design choices, and why:
- Whole splits live as tensors; a batch is an index slice of a shuffled permutation. No per-row Python,
  no dict per sample: this is what makes two CPU cores enough (see harness/benchmarks/train_throughput.py).
- Multi-task from day one: the model returns ``[B, T]`` logits, the loss is the sum of the T binary
  cross-entropies, early stopping watches the mean validation AUC over tasks (``emm.train.stopping``).
- Labels may be missing (NaN, per row and task): each task's cross-entropy is the mean over the batch's rows
  labelled for it (a task with none contributes 0, and no gradient), summed over tasks (``masked_bce``).
  With every label present this is the mean over the ``B x T`` entries times ``T``, the loss it always was.
  The reported training loss is the mean per labelled entry; validation metrics use labelled rows only.
- Exact resume: the shuffle of epoch ``e`` comes from a generator seeded with ``seed + e``, and the
  checkpoint written after every epoch holds the model, the optimizer, torch's RNG state (dropout) and
  the early-stopping state. Killing after epoch k and resuming gives the same weights bit for bit.
- Checkpoints are plain dicts of tensors and numbers, saved with ``torch.save`` and loaded with
  ``weights_only=True`` (no pickle of code).
- A checkpoint records what it was made from (``made_from``: the train settings, the data schema and
  whatever the caller adds, e.g. a model spec or the digests of upstream artifacts) and is resumed only
  when that record matches the current run. Otherwise it is stale work: resuming it would continue at
  the old learning rate (the optimizer state carries it) or bring back the old frozen weights, so
  the trainer logs what differs and trains from scratch. ``max_epochs`` is left out of the record on
  purpose: raising it and resuming is the same as training uninterrupted with the new cap; a checkpoint
  already past a lowered cap is ignored like a stale one.
- Past one machine (``emm.train.distributed``, ``emm.data.stream``): the training data may also be a
  ``ParquetStream`` (batches read row group by row group, bounded memory), and under ``torchrun`` the
  model trains wrapped in DDP with each rank given its shard. In a single process with in-memory tensors
  nothing of that runs: the batches, shuffles and results are the ones above, bit for bit.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from emm.data.stream import ParquetStream
from emm.data.tensors import SplitTensors
from emm.errors import EMMError
from emm.io import atomic_file, digest
from emm.models.embedding import fit_numeric, unfitted_numeric
from emm.tracker import NullTracker, Tracker
from emm.train import distributed as ddp
from emm.train.denormals import flush_denormals
from emm.train.distill import Distillation
from emm.train.metrics import mean_auc, task_metrics
from emm.train.modes import eval_mode
from emm.train.options import TrainConfig
from emm.train.predict import predict_proba, predict_stream
from emm.train.stopping import MAX_EPOCHS, EarlyStop

log = logging.getLogger(__name__)
NUMERIC_FIT_ROWS = 100_000  # training rows the numeric encoders' standardisation is fitted on
CHECKPOINT = "last.pt"
Data = SplitTensors | ParquetStream  # in memory (index-sliced batches) or streamed from Parquet


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
    stopped: str = MAX_EPOCHS  # why the fit ended: one of ``emm.train.stopping.REASONS``


class Trainer:
    """Adam + BCE, early stopping on mean validation AUC, best weights kept, a checkpoint per epoch.

    Under an initialised process group (``dist``, default: the active ``emm.train.distributed`` session)
    ``fit`` and ``evaluate`` take *this rank's shard* of each split; metrics are those of the whole split.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, checkpoint_dir: Path | None = None,
                 fingerprint: str | None = None, made_from: Mapping[str, Any] | None = None,
                 tracker: Tracker | None = None, progress: bool = True, desc: str = "train",
                 dist: ddp.DistContext | None = None, score_start: bool = False,
                 distill: Distillation | None = None, first_step: int = 0, start_patience: int | None = None) -> None:
        """``fingerprint`` (the data schema's) and ``made_from`` (JSON-able values: a spec, upstream
        digests) join the train settings in the record a checkpoint must match to be resumed;
        ``score_start`` makes the untrained model a candidate (epoch 0) that early stopping may return;
        ``distill`` trains on its soft targets instead of the labels (validation still scores labels);
        ``first_step``: epochs a previous phase already logged to the tracker, so this fit's steps follow them;
        ``start_patience`` (with ``score_start`` only): give up after that many epochs if no task beat its step-0
        validation AUC by more than ``min_delta`` (``emm.train.stopping``)."""
        self.cfg = cfg
        self.desc = desc
        self.dist = dist or ddp.current()
        self.device = self._device(cfg.device)
        self.model = model.to(self.device)
        self.distill = distill.to(self.device) if distill is not None else None
        if distill is not None:  # a different target is different work: never resume across it
            made_from = {**(made_from or {}), "distill_weight": distill.weight}
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.made_from = made_from_record(cfg, fingerprint, made_from)
        self.made_from_digest = digest(self.made_from)
        self.tracker = tracker or NullTracker()
        self.progress = progress
        self.first_step = first_step
        self.score_start = score_start  # the untrained model is a candidate: early stopping may return it
        self.stop = EarlyStop(cfg.patience, cfg.min_delta, start_patience if score_start else None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise EMMError(f"{desc}: the model has no trainable parameters")
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._net: nn.Module = self.model  # what the training step calls: the model, or DDP around it
        self._pad_to = 0  # rows every rank yields per epoch (fit sets it: the largest shard)

    def _device(self, preference: str) -> torch.device:
        if not self.dist.active:
            return pick_device(preference)
        if preference != "auto" and torch.device(preference).type != self.dist.device.type:
            raise EMMError(f"{self.desc}: train.device is {preference!r} but this distributed run uses "
                           f"{self.dist.device} ({self.dist.backend}); set device: auto or change scale.backend")
        return self.dist.device

    # ---- training ---------------------------------------------------------------------------------------
    def fit(self, train: Data, val: Data, *, resume: bool = False) -> FitResult:
        with flush_denormals():  # epochs keep the first one's speed as weights decay (emm.train.denormals)
            return self._fit(train, val, resume=resume)

    def _fit(self, train: Data, val: Data, *, resume: bool) -> FitResult:
        cfg = self.cfg
        if min(ddp.all_gather_ints(len(train), self.dist)) == 0 or min(ddp.all_gather_ints(len(val), self.dist)) == 0:
            raise EMMError(f"{self.desc}: empty training or validation split"
                           + (f" on some rank (fewer rows than the {self.dist.world_size} ranks?)"
                              if self.dist.active else ""))
        self._pad_to = max(ddp.all_gather_ints(len(train), self.dist))
        probe = train.head(2)
        self._check_output_width(probe)
        if unfitted_numeric(self.model):  # before best_state is copied, so the best weights carry the statistics
            fit_numeric(self.model, train.head(NUMERIC_FIT_ROWS).dense.to(self.device))
            log.info("%s: numeric standardisation fitted on the first %d training rows", self.desc, NUMERIC_FIT_ROWS)
        torch.manual_seed(cfg.seed)
        state = {"epoch": 0, "best_auc": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
        best_state = copy.deepcopy(self.model.state_dict())
        if resume:
            loaded = self._load_checkpoint()
            if loaded is not None:
                state, best_state = loaded
                log.info("%s: resumed after epoch %d", self.desc, state["epoch"])
        if self.score_start and state["epoch"] == 0:
            metrics = self.evaluate(val)
            state.update(best_auc=mean_auc(metrics), best_epoch=0)
            state["history"].append({"epoch": 0, "val_auc": state["best_auc"],
                                     **{f"val_auc_{t}": m["auc"] for t, m in metrics.items()}})
            log.info("%s epoch 0 (before training): val AUC %.5f", self.desc, state["best_auc"])
        self._net = ddp.wrap(self.model, (probe.sparse.to(self.device), probe.dense.to(self.device)), self.dist)
        train_dev = train.to(self.device) if isinstance(train, SplitTensors) else train
        started = time.perf_counter()
        stop = self.stop.reason(state)
        while state["epoch"] < cfg.max_epochs and stop is None:
            epoch = state["epoch"] + 1
            train_loss = self.train_epoch(train_dev, epoch)
            ddp.sync_buffers(self.model, self.dist)
            metrics = self.evaluate(val)
            val_auc = mean_auc(metrics)
            row = {"epoch": epoch, "train_loss": train_loss, "val_auc": val_auc,
                   **{f"val_auc_{t}": m["auc"] for t, m in metrics.items()},
                   **{f"val_logloss_{t}": m["logloss"] for t, m in metrics.items()}}
            state["history"].append(row)
            if self.stop.improves(val_auc, state["best_auc"]):
                state.update(best_auc=val_auc, best_epoch=epoch, bad_epochs=0)
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            stop = self.stop.reason(state)
            self._save_checkpoint(state, best_state)
            self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=self.first_step + epoch)
            log.info("%s epoch %d: loss %.5f val AUC %.5f%s", self.desc, epoch, train_loss, val_auc,
                     " (best)" if state["best_epoch"] == epoch else "")
        if stop is not None:
            log.info("%s: stopped after epoch %d: %s", self.desc, state["epoch"], self.stop.describe(stop))
        self.model.load_state_dict(best_state)
        self._net = self.model
        return FitResult(best_epoch=state["best_epoch"], best_val_auc=state["best_auc"], epochs_run=state["epoch"],
                         stopped_early=stop is not None, seconds=time.perf_counter() - started,
                         history=state["history"], stopped=stop or MAX_EPOCHS)

    @torch.no_grad()
    def _check_output_width(self, data: SplitTensors) -> None:
        with eval_mode(self.model):
            out = self.model(data.sparse[:2].to(self.device), data.dense[:2].to(self.device))
        if out.shape[1:] != data.labels.shape[1:]:
            raise EMMError(f"{self.desc}: the model returns {out.shape[1]} output(s) per row but the data has "
                           f"{data.labels.shape[1]} task(s) {data.task_names}; select the model's task(s) first")

    def _epoch_batches(self, data: Data, epoch: int) -> Iterator[SplitTensors]:
        """This rank's batches of one epoch: index slices of a seeded permutation, or the stream's own.

        Distributed, every rank yields the same number of rows (``_pad_to``, the largest shard; a shorter
        shard repeats a row) so that all ranks take the same number of DDP steps.
        """
        bs = self.dist.local_batch(self.cfg.batch_size)
        rank_seed = self.cfg.seed + epoch
        if self.dist.active:  # a different shuffle per rank; one process keeps the historical seed
            rank_seed = int(np.random.SeedSequence([self.cfg.seed, epoch, self.dist.rank]).generate_state(1)[0])
        if isinstance(data, ParquetStream):
            for batch in data.batches(bs, shuffle=True, seed=rank_seed, epoch=epoch, pad_to=self._pad_to):
                yield batch.to(self.device)
            return
        n = len(data)
        gen = torch.Generator().manual_seed(rank_seed)
        order = torch.randperm(n, generator=gen)
        if self._pad_to > n:
            order = torch.cat([order, order[:self._pad_to - n]])
        order = order.to(self.device)
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            yield SplitTensors(data.sparse[idx], data.dense[idx], data.labels[idx], data.task_names)

    def train_epoch(self, data: Data, epoch: int) -> float:
        """One training epoch as ``fit`` runs it (the shuffle seeded by ``epoch``, a step per batch), without
        validation, checkpoint or logging: ``fit``'s own loop, and the public handle for timing the training
        step (harness/benchmarks/). Trains the model; returns the mean training loss per labelled label
        (NaN when no training row carries any label)."""
        self.model.train()
        self._net.train()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = torch.zeros((), dtype=torch.float64, device=self.device)
        bs = self.dist.local_batch(self.cfg.batch_size)
        bar = tqdm(self._epoch_batches(data, epoch), total=math.ceil(max(self._pad_to, len(data)) / bs),
                   desc=f"{self.desc} epoch {epoch}", leave=False, disable=not self.progress, mininterval=1.0)
        for step, batch in enumerate(bar):
            logits = self._net(batch.sparse, batch.dense)
            targets = (batch.labels if self.distill is None
                       else self.distill.targets(batch.sparse, batch.dense, batch.labels))
            loss, batch_sum = masked_bce(logits, targets, torch.isnan(batch.labels), self.dist)
            if not torch.isfinite(batch_sum[0]):
                loss = batch_sum[0] / batch_sum[1]
                where = f"epoch {epoch}, step {step}"
                kept = (f"the last good checkpoint (after epoch {epoch - 1}) is kept in {self.checkpoint_dir}"
                        if self.checkpoint_dir else "no checkpoint directory was set")
                raise EMMError(f"{self.desc}: the training loss became {loss.item()} at {where}; {kept}. "
                               f"Lower the learning rate or check the input data for extreme values.")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += batch_sum[0]
            seen += batch_sum[1]
            if self.progress and step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        return float(total) / float(seen) if float(seen) > 0 else math.nan

    def profile_epoch(self, data: Data, steps: int, *, epoch: int = 1, top: int = 12) -> str:
        """torch.profiler's operator table (self CPU time, ``top`` rows) over ``steps`` batches of the training
        loop: ``train_epoch`` on the first ``steps`` batches' rows at ``epoch`` (a warm-up, not profiled), then
        at ``epoch + 1``. It trains the model, so profile a model you do not keep, or before ``fit``."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        rows = data.head(steps * self.cfg.batch_size)
        self.train_epoch(rows, epoch)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            self.train_epoch(rows, epoch + 1)
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)

    # ---- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, data: Data) -> np.ndarray:
        """Probabilities [N, T] for the rows given (distributed: this rank's shard only)."""
        if isinstance(data, ParquetStream):
            return predict_stream(self.model, data, self.cfg.eval_batch_size, self.device)[0]
        return predict_proba(self.model, data, self.cfg.eval_batch_size, self.device)

    def evaluate(self, data: Data) -> dict[str, dict[str, float]]:
        """Per-task AUC/logloss of the whole split (distributed: shards gathered, computed on rank 0 and
        broadcast, so every rank takes the same early-stopping decision)."""
        if isinstance(data, ParquetStream):
            probs, labels = predict_stream(self.model, data, self.cfg.eval_batch_size, self.device)
        else:
            probs, labels = self.predict(data), data.labels.numpy()
        if not self.dist.active:
            return task_metrics(labels, probs, data.task_names, what=f"model {self.desc!r}")
        probs, labels = ddp.gather_rows(probs, self.dist), ddp.gather_rows(labels, self.dist)
        return ddp.on_main(lambda: task_metrics(labels, probs, data.task_names, what=f"model {self.desc!r}"),
                           self.dist)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _save_checkpoint(self, state: dict[str, Any], best_state: dict[str, torch.Tensor]) -> None:
        if self.checkpoint_dir is None or not self.dist.is_main:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "best_model": best_state,
            "state": state, "torch_rng": torch.get_rng_state(),
            "made_from": json.dumps(self.made_from, sort_keys=True), "made_from_digest": self.made_from_digest,
        }
        with atomic_file(self.checkpoint_dir / CHECKPOINT) as tmp:  # a kill mid-save keeps the previous epoch
            torch.save(payload, tmp)

    def _read_checkpoint(self) -> dict[str, Any] | None:
        path = (self.checkpoint_dir or Path("/nonexistent")) / CHECKPOINT
        if not path.exists():
            log.info("%s: no checkpoint at %s, starting fresh", self.desc, path)
            return None
        # distributed: read on CPU, since the payload is pickled to the other ranks
        payload = torch.load(path, map_location="cpu" if self.dist.active else self.device, weights_only=True)
        stale = self._stale_reason(payload)
        if stale:
            log.warning("%s: not resuming %s: %s; training from scratch", self.desc, path, stale)
            return None
        payload["path"] = str(path)
        return payload

    def _stale_reason(self, payload: dict[str, Any]) -> str | None:
        """Why the checkpoint is not this run's unfinished work (None: it is)."""
        if payload.get("made_from_digest") != self.made_from_digest:
            if "made_from" not in payload:
                return "it does not record what it was made from (written by an older version)"
            changed = differences(json.loads(payload["made_from"]), self.made_from)
            return f"it was made from different settings or inputs ({changed})"
        if payload["state"]["epoch"] > self.cfg.max_epochs:
            return (f"it is after epoch {payload['state']['epoch']}, past max_epochs {self.cfg.max_epochs} "
                    f"(a run with this cap never got there)")
        return None

    def _load_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """Rank 0 reads the checkpoint and every rank applies it (one process: just read and apply)."""
        payload = ddp.on_main(self._read_checkpoint, self.dist)
        if payload is None:
            return None
        path = payload["path"]
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as exc:
            raise EMMError(f"{path} does not fit this model's architecture: {str(exc).splitlines()[0]}. "
                           f"Delete it to start fresh.") from exc
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        return payload["state"], payload["best_model"]


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, missing: torch.Tensor,
               dist: ddp.DistContext | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, float64 [sum of the labelled entries' BCE, labelled entries] of the global batch).

    ``missing`` ([B, T] bool) marks the entries without a label; their targets (NaN) are replaced by 0 before
    the cross-entropy and their terms by 0 after it (``where``, so not even a NaN gradient leaks from them).
    Task ``t``'s term is its labelled rows' BCE sum over their count in the *global* batch: distributed, the
    per-task sums and counts are all-reduced, and each rank's sum is scaled by ``world / count`` so that
    DDP's gradient average is the global per-task mean however the labelled rows fall across ranks. A NaN
    on any rank shows in every rank's first returned sum, so all ranks stop together.
    """
    dist = dist or ddp.current()
    labelled = ~missing
    per_entry = F.binary_cross_entropy_with_logits(logits, torch.where(labelled, targets, torch.zeros_like(targets)),
                                                   reduction="none")
    per_task = torch.where(labelled, per_entry, torch.zeros_like(per_entry)).sum(dim=0)  # [T]
    counts = labelled.sum(dim=0, dtype=torch.float64)                                    # exact past 2**24
    stats = ddp.all_reduce_sum(torch.cat([per_task.detach().double(), counts]), dist)
    tasks = per_task.shape[0]
    world = dist.world_size if dist.active else 1
    scale = (world / stats[tasks:].clamp(min=1.0)).to(per_task.dtype)  # a task with no labelled row: sum 0
    loss = (per_task * scale).sum()
    return loss, torch.stack([stats[:tasks].sum(), stats[tasks:].sum()])


def made_from_record(cfg: TrainConfig, fingerprint: str | None = None,
                     made_from: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must have been made from to be resumed: the train settings but ``max_epochs``
    (see the module docstring), the data schema, and the caller's own entries (which win on a clash)."""
    record: dict[str, Any] = {"train": cfg.model_dump(mode="json", exclude={"max_epochs"})}
    if fingerprint:
        record["schema"] = fingerprint
    record.update(made_from or {})
    return json.loads(json.dumps(record, sort_keys=True, default=str))  # JSON-normal: compares as it reloads


def differences(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """``"train.lr 0.005 -> 0.001; pool 'ab..' -> 'cd..'"``: the leaves of two records that differ."""
    a, b = _leaves(old), _leaves(new)
    unset = "<unset>"
    changed = [f"{k} {a.get(k, unset)!r} -> {b.get(k, unset)!r}" for k in sorted(set(a) | set(b))
               if a.get(k, unset) != b.get(k, unset)]
    more = f"; and {len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more if changed else "the records differ"


def _leaves(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
