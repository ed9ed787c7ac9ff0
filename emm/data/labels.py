"""Missing labels: which rows carry a task's label, and which keep it under ``label_fraction``.

A row may lack a task's label, either in the raw data (``TaskSpec.missing_values``) or held back on purpose
(``ingest.label_fraction``, ``synth.label_fraction``: the scarce-task experiments). Parquet splits hold such a
label as a null of the int8 task column; tensors and stream batches as NaN. Every stage masks per task with
:func:`labelled_mask`.

Why a counter hash for ``keep_mask`` rather than a seeded generator: the kept rows must not depend on how
the writer happened to chunk the split (block sizes, carve order), and a smaller fraction must keep a
subset of the rows a larger one keeps (rows kept at 2% are kept at 5%), so that a sweep over fractions
compares nested label sets. A per-row hash of (seed, task, split, row index) -> uniform [0, 1) compared
with the fraction gives both for free.
"""

from __future__ import annotations

import hashlib

import numpy as np

from emm.errors import EMMError

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio in 64 bits)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def labelled_mask(labels):
    """True where a label is present (``~isnan``); works on numpy arrays and torch tensors alike."""
    if isinstance(labels, np.ndarray):
        return ~np.isnan(labels)
    return ~labels.isnan()


def _stream_key(seed: int, task: str, split: str) -> np.uint64:
    """A 64-bit key per (seed, task, split): each task and split gets its own independent row draws."""
    raw = hashlib.sha256(f"emm-label-fraction/{seed}/{task}/{split}".encode()).digest()
    return np.uint64(int.from_bytes(raw[:8], "little"))


def _splitmix64(state: np.ndarray) -> np.ndarray:
    z = state.copy()
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def row_uniforms(start: int, n: int, *, seed: int, task: str, split: str) -> np.ndarray:
    """Uniform [0, 1) draws of rows ``start..start+n-1``, a pure function of (seed, task, split, row index)."""
    if start < 0 or n < 0:
        raise ValueError(f"rows start at {start}, count {n}: both must be >= 0")
    index = np.arange(start, start + n, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        state = _stream_key(seed, task, split) + index * _GAMMA  # wraps modulo 2**64, as splitmix64 does
        z = _splitmix64(state)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def keep_mask(start: int, n: int, fraction: float, *, seed: int, task: str, split: str) -> np.ndarray:
    """Which of the rows ``start..start+n-1`` (index within the split as written) keep ``task``'s label.

    About ``fraction`` of them, independent of chunking, nested across fractions (see the module doc).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction} of task {task!r} is outside (0, 1]")
    if fraction >= 1:
        return np.ones(n, dtype=bool)
    return row_uniforms(start, n, seed=seed, task=task, split=split) < fraction


def unlabelled_message(task: str, split: str, what: str, labelled: int, positives: int) -> str | None:
    """Why a task cannot be scored on a split (None when it can): no labelled row, or one class only.

    One wording for ingest (which refuses to write such data) and for every later stage (which meets it
    through :func:`require_labelled`), so the user reads the same fix wherever it surfaces.
    """
    fix = ("raise ingest.label_fraction (or synth.label_fraction) for this task, give it more labelled rows, "
           "or leave the task out (ingest.tasks in params.yaml)")
    if labelled == 0:
        return (f"task {task!r} has no labelled row in split {split!r} ({what}): its AUC is undefined there; "
                f"{fix}")
    if positives == 0 or positives == labelled:
        kind = "negative" if positives == 0 else "positive"
        return (f"task {task!r} has labelled rows of one class only in split {split!r} ({what}): all {labelled} "
                f"are {kind}, so its AUC is undefined there; {fix}")
    return None


def require_labelled(labels_col, task: str, split: str, what: str) -> np.ndarray:
    """The mask of ``task``'s labelled rows in ``labels_col`` (NaN = no label), refusing an unscorable column.

    Raises EMMError when no row is labelled or the labelled rows hold a single class (AUC undefined).
    Accepts a numpy array or a torch tensor; always returns a numpy bool array.
    """
    y = labels_col if isinstance(labels_col, np.ndarray) else labels_col.detach().cpu().numpy()
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    mask = ~np.isnan(y)
    problem = unlabelled_message(task, split, what, int(mask.sum()), int((y[mask] > 0.5).sum()))
    if problem:
        raise EMMError(problem)
    return mask
