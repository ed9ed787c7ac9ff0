"""``emm synth``: a synthetic table in the AliExpress layout, any number of rows, with planted task relations.

Why synthetic: the real AliExpress files need a Tianchi account and only 120 sample rows ship here, yet
"training over 20M rows keeps memory bounded" must be shown on a table of that shape and size; and a
fusion method needs task *relations* to exploit, which a generator can plant and a test can check.

Why it writes the *ingested* format (train/val/test.parquet + schema.json + vocabulary.parquet) and not
raw CSV for ``emm ingest``: ingesting would write and parse the same rows twice (a 20M-row CSV is ~10 GB
of text) for nothing, since the generator already produces encoded values: category indices 1..V (0
stays reserved for unseen), dense values already in [0, 1]. Every later stage reads it unchanged
(``emm pretrain aliexpress-synth`` after ``emm synth``). The column names, kinds and tasks are those of the
built-in ``aliexpress`` declaration, so the layout cannot drift from it.

Generative story (per row; all parameters drawn once from the seed and recorded in ``synth.json``):
- categorical_j ~ Zipf(V_j, s) over a shuffled vocabulary; dense_j ~ uniform on ``dense_levels`` grid
  points of [0, 1]. Each feature has a role: *shared*, *click*, *conversion*, or noise.
- three unit-variance scores: ``S`` (shared latent, e.g. purchase intent) from the shared features, ``C``
  from click's own, ``V`` from conversion's own (categorical: a random effect per category, standardised
  under its Zipf frequencies; dense: a random linear weight on the standardised value).
- click ~ Bernoulli(sigmoid(a_c + signal * (sqrt(w) S + sqrt(1-w) C)))
- conversion = click AND Bernoulli(sigmoid(a_v + signal * (sqrt(w) S + sqrt(1-w) V)))
  (w = shared_weight; a_c, a_v calibrated on a sample to hit click_rate and conversion_given_click).
Checkable relations: conversion implies click on every row; and click's own score ranks conversions far
above chance (through S). ``synth.json`` also records each task's oracle AUC (the true probabilities as
scores, on the calibration sample): the ceiling any model can reach.

Memory: rows are generated and written ``row_group_rows`` at a time (one Parquet row group each).

``label_fraction`` (task -> share) holds back labels in train and val exactly as ``ingest.label_fraction``
does (``emm.data.labels.keep_mask`` on the row index within the split; nulls in Parquet). The rows and their
full labels are generated unchanged, so ``true_probabilities`` still returns every label.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from emm.data.options import SynthConfig
from emm.data.encoding import Encoder
from emm.data.labels import keep_mask, unlabelled_message
from emm.data.schema import VOCAB_FILE, DenseFeature, Schema, SparseFeature, TaskInfo
from emm.data.spec import SPLITS, resolve_dataset
from emm.errors import EMMError
from emm.io import atomic_dir, digest, provenance, write_json

log = logging.getLogger(__name__)
LAYOUT = "aliexpress"  # the built-in declaration whose columns and tasks the table copies
SYNTH_FILE = "synth.json"
ROLES = ("shared", "click", "conversion")
DENSE_PER_CATEGORICAL = 4  # each role gets this many dense features per categorical one
CALIBRATION_ROWS = 200_000  # sample that fixes the base rates and measures the oracle AUCs
BISECTION_STEPS = 60


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class Generator:
    """The drawn parameters of one synthetic world; ``rows()`` samples from it."""

    cfg: SynthConfig
    sparse: list[str]
    dense: list[str]
    vocab: list[int]             # V_j: categories 1..V_j
    cdf: list[np.ndarray]        # Zipf cdf over frequency ranks
    category_of_rank: list[np.ndarray]
    effect: list[np.ndarray]     # standardised effect per category id (index 0 unused)
    sparse_role: list[str]       # role per categorical ("noise" = none)
    dense_role: list[str]
    sparse_weight: np.ndarray    # weight of each feature inside its role's score (sum of squares 1 per role)
    dense_weight: np.ndarray
    offsets: dict[str, float]    # a_c, a_v

    @classmethod
    def draw(cls, cfg: SynthConfig) -> "Generator":
        spec = resolve_dataset(LAYOUT)
        sparse, dense = list(spec.sparse), list(spec.dense)
        rng = np.random.default_rng([cfg.seed, 0])
        vocab = [cfg.vocab_sizes[j % len(cfg.vocab_sizes)] for j in range(len(sparse))]
        n_cat = {"shared": cfg.shared_features, "click": cfg.specific_features, "conversion": cfg.specific_features}
        if sum(n_cat.values()) > len(sparse) or DENSE_PER_CATEGORICAL * sum(n_cat.values()) > len(dense):
            raise ValueError(f"synth: {sum(n_cat.values())} categorical features with a role, but the layout has "
                             f"{len(sparse)}; lower shared_features / specific_features")
        sparse_role = _assign_roles(rng, len(sparse), n_cat, 1)
        dense_role = _assign_roles(rng, len(dense), n_cat, DENSE_PER_CATEGORICAL)
        cdf, category_of_rank, effect = [], [], []
        for v in vocab:
            p = np.arange(1, v + 1, dtype=np.float64) ** -cfg.zipf_exponent
            p /= p.sum()
            cdf.append(np.cumsum(p))
            order = rng.permutation(v) + 1  # frequency rank -> category id 1..V
            category_of_rank.append(order)
            e = np.zeros(v + 1)
            e[order] = rng.standard_normal(v)
            mean = float((p * e[order]).sum())
            std = math.sqrt(max(float((p * (e[order] - mean) ** 2).sum()), 1e-12))
            e[1:] = (e[1:] - mean) / std  # unit variance under the Zipf frequencies
            effect.append(e)
        sparse_weight = _role_weights(rng, sparse_role, dense_role)
        gen = cls(cfg, sparse, dense, vocab, cdf, category_of_rank, effect, sparse_role, dense_role,
                  sparse_weight[: len(sparse)], sparse_weight[len(sparse):], {"click": 0.0, "conversion": 0.0})
        gen._calibrate()
        return gen

    # ---- sampling ---------------------------------------------------------------------------------------------
    def features(self, rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Encoded feature columns and the three role scores for ``n`` rows."""
        cols: dict[str, np.ndarray] = {}
        scores = {r: np.zeros(n) for r in ROLES}
        for j, name in enumerate(self.sparse):
            rank = np.minimum(np.searchsorted(self.cdf[j], rng.random(n), side="right"), self.vocab[j] - 1)
            cat = self.category_of_rank[j][rank]
            cols[name] = cat.astype(np.int32)
            if self.sparse_role[j] in scores:
                scores[self.sparse_role[j]] += self.sparse_weight[j] * self.effect[j][cat]
        levels = self.cfg.dense_levels
        grid = rng.integers(0, levels, size=(n, len(self.dense)), dtype=np.int16)
        x = grid.astype(np.float32) / np.float32(levels - 1)
        mean, std = 0.5, math.sqrt((levels + 1) / (12.0 * (levels - 1)))  # of the uniform grid on [0, 1]
        for role in ROLES:
            idx = [j for j, r in enumerate(self.dense_role) if r == role]
            scores[role] += ((x[:, idx] - mean) / std) @ self.dense_weight[idx]
        for j, name in enumerate(self.dense):
            cols[name] = x[:, j]
        return cols, scores

    def logits(self, scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        w, signal = self.cfg.shared_weight, self.cfg.signal
        return {task: self.offsets[task] + signal * (math.sqrt(w) * scores["shared"] + math.sqrt(1 - w) * scores[task])
                for task in ("click", "conversion")}

    def rows(self, rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(columns incl. labels, true probabilities) for ``n`` rows."""
        cols, scores = self.features(rng, n)
        z = self.logits(scores)
        p_click = _sigmoid(z["click"])
        p_conv_given_click = _sigmoid(z["conversion"])
        click = rng.random(n) < p_click
        conversion = click & (rng.random(n) < p_conv_given_click)  # planted: no conversion without a click
        cols["click"] = click.astype(np.int8)
        cols["conversion"] = conversion.astype(np.int8)
        return cols, {"click": p_click, "conversion": p_click * p_conv_given_click}

    # ---- calibration ----------------------------------------------------------------------------------------------
    def _calibrate(self) -> None:
        """Choose a_c, a_v so the expected rates hit the targets; measure the oracle AUCs."""
        rng = np.random.default_rng([self.cfg.seed, 1])
        n = min(CALIBRATION_ROWS, max(self.cfg.rows, 10_000))
        _, scores = self.features(rng, n)
        self.offsets = {"click": 0.0, "conversion": 0.0}
        z = self.logits(scores)
        self.offsets["click"] = _solve_offset(z["click"], np.ones(n), self.cfg.click_rate)
        p_click = _sigmoid(z["click"] + self.offsets["click"])
        self.offsets["conversion"] = _solve_offset(z["conversion"], p_click, self.cfg.conversion_given_click)
        cols, probs = self.rows(rng, n)
        self.oracle_auc = {t: float(roc_auc_score(cols[t], probs[t])) for t in ("click", "conversion")}
        # the relation a fusion method can use: click's own probability ranks conversions
        self.click_score_auc_on_conversion = float(roc_auc_score(cols["conversion"], probs["click"]))

    def record(self) -> dict:
        return {
            "layout": LAYOUT, "config": self.cfg.model_dump(mode="json"),
            "roles": {"sparse": dict(zip(self.sparse, self.sparse_role)), "dense": dict(zip(self.dense, self.dense_role))},
            "offsets": self.offsets, "oracle_auc": self.oracle_auc,
            "click_probability_auc_on_conversion": self.click_score_auc_on_conversion,
            "story": "click ~ B(sigmoid(a_c + signal*(sqrt(w)S + sqrt(1-w)C))); conversion = click AND "
                     "B(sigmoid(a_v + signal*(sqrt(w)S + sqrt(1-w)V))); S shared latent, C/V task-specific",
        }


def _assign_roles(rng: np.random.Generator, n: int, counts: dict[str, int], per: int) -> list[str]:
    roles = ["noise"] * n
    slots = iter(rng.permutation(n))
    for role, k in counts.items():
        for _ in range(k * per):
            roles[next(slots)] = role
    return roles


def _role_weights(rng: np.random.Generator, sparse_role: list[str], dense_role: list[str]) -> np.ndarray:
    """Random weights per feature, scaled so each role's score has unit variance (sum of squares 1)."""
    roles = np.array(sparse_role + dense_role)
    w = rng.standard_normal(len(roles))
    for role in ROLES:
        mask = roles == role
        w[mask] /= np.sqrt((w[mask] ** 2).sum())
    w[roles == "noise"] = 0.0
    return w


def _solve_offset(z: np.ndarray, weight: np.ndarray, target: float) -> float:
    """a with sum(weight * sigmoid(z + a)) / sum(weight) == target (monotone in a: bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        rate = float((weight * _sigmoid(z + mid)).sum() / weight.sum())
        lo, hi = (mid, hi) if rate < target else (lo, mid)
    return (lo + hi) / 2


def split_rows(cfg: SynthConfig) -> dict[str, int]:
    val = max(1, round(cfg.rows * cfg.val_fraction))
    test = max(1, round(cfg.rows * cfg.test_fraction))
    train = cfg.rows - val - test
    if train < 1:
        raise ValueError(f"synth: {cfg.rows} rows leave no training rows")
    return {"train": train, "val": val, "test": test}


def synthesize(cfg: SynthConfig, out_dir: Path) -> Schema:
    """Write the dataset into ``out_dir`` (atomically) and return its schema."""
    started = time.perf_counter()
    try:
        counts = split_rows(cfg)
        gen = Generator.draw(cfg)
    except ValueError as exc:
        raise EMMError(str(exc)) from exc
    tasks = ["click", "conversion"]
    unknown = [t for t in cfg.label_fraction if t not in tasks]
    if unknown:
        raise EMMError(f"synth.label_fraction names task(s) {unknown}; the synthetic tasks are {tasks}")
    fractions = {t: float(f) for t, f in cfg.label_fraction.items() if f < 1}
    positives = {s: {t: 0 for t in tasks} for s in SPLITS}
    labelled = {s: {t: 0 for t in tasks} for s in SPLITS}
    arrow_schema = pa.schema([(c, pa.int32()) for c in gen.sparse] + [(c, pa.float32()) for c in gen.dense]
                             + [(t, pa.int8()) for t in tasks])
    with atomic_dir(Path(out_dir)) as tmp:
        for split_index, split in enumerate(SPLITS):
            with pq.ParquetWriter(tmp / f"{split}.parquet", arrow_schema) as writer:
                for chunk, start in enumerate(range(0, counts[split], cfg.row_group_rows)):
                    n = min(cfg.row_group_rows, counts[split] - start)
                    cols, _ = gen.rows(np.random.default_rng([cfg.seed, 2, split_index, chunk]), n)
                    arrays = {c: pa.array(v) for c, v in cols.items()}
                    for t in tasks:
                        has = np.ones(n, dtype=bool)
                        if t in fractions and split != "test":
                            has = keep_mask(start, n, fractions[t], seed=cfg.seed, task=t, split=split)
                        arrays[t] = pa.array(cols[t], mask=~has, type=pa.int8())
                        labelled[split][t] += int(has.sum())
                        positives[split][t] += int(cols[t][has].sum())
                    writer.write_table(pa.table(arrays, schema=arrow_schema), row_group_size=n)
            log.info("synth: %s %d rows", split, counts[split])
        encoder = Encoder(sparse=gen.sparse, dense=gen.dense)
        encoder.vocab = {c: [f"{c}_{k:06d}" for k in range(1, v + 1)] for c, v in zip(gen.sparse, gen.vocab)}
        encoder.save_vocabulary(tmp / VOCAB_FILE)
        for t in fractions:  # without a fraction the table is as before (tiny test tables included)
            for split in SPLITS:
                problem = unlabelled_message(t, split, f"synth.label_fraction {fractions[t]}, {counts[split]} rows",
                                             labelled[split][t], positives[split][t])
                if problem:
                    raise EMMError(f"emm synth: {problem}")
        schema = _schema(cfg, gen, counts, positives, labelled, tasks, fractions)
        schema.save(tmp)
        write_json(tmp / SYNTH_FILE, {**gen.record(), "rows": counts, "positives": positives, "labelled": labelled,
                                      "label_fraction": fractions,
                                      "seconds": round(time.perf_counter() - started, 1)})
    log.info("synth: %d rows in %.1fs -> %s", cfg.rows, time.perf_counter() - started, out_dir)
    return schema


def true_probabilities(cfg: SynthConfig, split: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(labels, true probabilities) of every row of ``split`` as ``synthesize(cfg, ...)`` wrote it.

    Why regenerate rather than store: the rows are a pure function of the config (the same seeded
    draws, chunk by chunk), so the oracle's scores on the very test rows a model is scored on cost a few
    seconds and no disk; the labels come back too, so a caller can check they match the written file.
    """
    counts = split_rows(cfg)
    gen = Generator.draw(cfg)
    split_index = SPLITS.index(split)
    labels: dict[str, list[np.ndarray]] = {"click": [], "conversion": []}
    probs: dict[str, list[np.ndarray]] = {"click": [], "conversion": []}
    for chunk, start in enumerate(range(0, counts[split], cfg.row_group_rows)):
        n = min(cfg.row_group_rows, counts[split] - start)
        cols, p = gen.rows(np.random.default_rng([cfg.seed, 2, split_index, chunk]), n)
        for t in labels:
            labels[t].append(cols[t])
            probs[t].append(p[t])
    return ({t: np.concatenate(v) for t, v in labels.items()}, {t: np.concatenate(v) for t, v in probs.items()})


def _schema(cfg: SynthConfig, gen: Generator, counts: dict[str, int], positives: dict[str, dict[str, int]],
            labelled: dict[str, dict[str, int]], tasks: list[str], fractions: dict[str, float]) -> Schema:
    sparse, offset = [], 0
    for name, v in zip(gen.sparse, gen.vocab):
        sparse.append(SparseFeature(name=name, vocab_size=v + 1, offset=offset))
        offset += v + 1
    task_infos = [TaskInfo(name=t, column=t, rule={"column": t, "threshold": 0.5},
                           positives={s: positives[s][t] for s in SPLITS},
                           positive_rate={s: positives[s][t] / max(labelled[s][t], 1) for s in SPLITS},
                           labelled={s: labelled[s][t] for s in SPLITS}) for t in tasks]
    return Schema(
        dataset=cfg.dataset, sparse=sparse, dense=[DenseFeature(name=c, min=0.0, max=1.0) for c in gen.dense],
        tasks=task_infos, rows=counts, raw_files=[],
        encoding={"sparse": "synthetic category ids 1..V (index 0 reserved for unseen, never generated)",
                  "dense": "synthetic values on a grid in [0, 1] (already scaled)",
                  "note": f"emm synth: {LAYOUT} layout, planted task relations; see {SYNTH_FILE}",
                  "seed": cfg.seed, "label_fraction": fractions},
        provenance=provenance(digest(cfg)),
    )
