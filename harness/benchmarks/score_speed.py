"""Scoring speed, one run, the same raw rows: the fused model (as saved, pruned, and as trained, unpruned), the
compact model (``emm compress``), each in torch eager and in onnxruntime, against the two LightGBM boosters in
LightGBM and compiled by lleaves; with every ratio issue 25's goals ask for.

The rows are the first ``--rows`` lines of the raw UCI test file (``data/<dataset>/``), read as ``emm predict``
reads a headerless raw file (text). They are encoded once by the ingestion ``Encoder`` (vocabularies, dense
scaling, buckets), which every model needs, and that cost is shown apart; then, in interleaved rounds (every side
once per round, in turn: the machine's load falls on all alike), each side scores the encoded rows and the
medians are reported as rows/s, with ratios, and end to end (encoding included).

- fused: ``fused/`` (``load_fused``), ``predict_proba``; onnxruntime on ``export/fused.onnx`` when it was exported
  from these weights (``emm export``), else on a fresh export of the same graph.
- unpruned: the same architecture without its recorded pruning (``emm.fusion.prune``), i.e. what the fuse stage
  trained and every row paid before the stage saved its model pruned. Its weights come from the fuse stage's last
  checkpoint (``fused-work/checkpoint``: the best epoch's state) when that loads, and then pruning it must give the
  saved scores (the difference is shown); else from the saved weights with the parts pruning left out at their
  initial values (the cost is the same; the scores are not, and are not compared).
- compact: ``compact/`` (``compact.json``'s spec, ``compact.safetensors``); onnxruntime on ``compact/compact.onnx``
  (the compress stage exports it from the same weights, checked against torch), also once through emm's own
  ``onnx_session`` ("plain") to show what the tuned session options give.
- LightGBM: one booster per task, trained here by the benchmark's LightGBM row itself
  (``emm.train.lightgbm_row.lightgbm_per_task``: its parameters, features and early stopping); scoring both tasks
  is one row's work. lleaves compiles the same two boosters (at their best iteration) to machine code with LLVM
  (the compile time is shown apart); both get the same float64 matrix.

Every side gets ``--threads`` threads (torch, onnxruntime's intra-op pool, LightGBM, lleaves' jobs), and the
torch and onnxruntime sides the same ``--batch-size``. A model whose files are absent is left out with the
reason printed. The onnxruntime sessions are ``tuned_session_options`` (all made before the one plain session:
see there why the order matters).

    python -m harness.benchmarks.score_speed [--dataset census-income] [--rows 50000] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from emm.data.encoding import Encoder
from emm.data.reader import resolve_file
from emm.data.schema import Schema, check_fingerprint
from emm.data.spec import resolve_dataset
from emm.data.tensors import frame_to_tensors
from emm.errors import EMMError
from emm.fusion.prune import prune
from emm.fusion.saved import FUSED_JSON, FUSED_WEIGHTS, build_from_config, load_fused
from emm.io import read_json, sha256_file
from emm.pipeline.compress import COMPACT_JSON, COMPACT_ONNX, COMPACT_WEIGHTS
from emm.pipeline.export import (EXPORT_JSON, INPUTS, ONNX_FILE, OUTPUT, UnseenGuard, export_onnx, onnx_session)
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import load_params
from emm.tracking.pyfunc import SCORE_BATCH_ROWS
from emm.train.compact import build_from_config as build_compact_from_config
from emm.train.cost import model_cost
from emm.train.lightgbm_row import lightgbm_features, lightgbm_per_task
from emm.train.predict import predict_proba
from emm.train.trainer import CHECKPOINT
from emm.weights import load_module

from harness.benchmarks.train_throughput import load_average

# onnxruntime session config entries beyond the SessionOptions fields (see ``tuned_session_options``)
TUNED_CONFIG = {"session.set_denormal_as_zero": "1"}
COMPACT_GOAL_X, COMPACT_GOAL_ROWS, COMPACT_MOONSHOT_ROWS = 5.0, 300_000, 1_000_000  # issue 25: vs LightGBM x2
PRUNED_GOAL_X = 2.0  # issue 25: the pruned fused model vs the unpruned one
LGB, LLEAVES = "LightGBM x2", "lleaves x2"
TREES, TREES_WALK = "fused's trees", "fused's trees walk"  # the fused model's tree members alone


# ---- the scorers --------------------------------------------------------------------------------------------
def tuned_session_options(threads: int) -> Any:
    """onnxruntime ``SessionOptions`` for scoring batches on a few CPU cores.

    Why each: every graph optimisation (``ORT_ENABLE_ALL``: constant folding, node fusions such as MatMul+Add into
    Gemm, layout changes); ``threads`` intra-op threads (one per core the benchmark grants) and one inter-op thread
    with sequential execution (these models are one chain of ops: running two branches at once only adds a
    second pool contending for the same cores); denormal floats flushed to zero, which is what measures faster:
    x86 computes with denormals many times slower, and a weight that weight decay left tiny times an activation
    makes one (``emm.train.compact.flush_tiny_weights`` removes such weights at the source; this removes the
    rest), while a value below float32's smallest normal number changes no score. Also tried, no faster:
    a smaller minimum block of the parallel loops (``session.dynamic_block_base``), spinning threads off.

    Order matters within a process: a tuned session made after a plain one measured as slow as the plain one (the
    denormal setting seems to follow the first session's), so ``main`` makes every tuned session first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for key, value in TUNED_CONFIG.items():
        options.add_session_config_entry(key, value)
    return options


def tuned_session(path: Path, threads: int) -> Any:
    """An onnxruntime CPU session on ``path`` with ``tuned_session_options``."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), tuned_session_options(threads), providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, sparse: np.ndarray, dense: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits [N, T] of an exported EMM model (inputs ``sparse``/``dense``), ``batch_size`` rows per call."""
    return np.concatenate([session.run([OUTPUT], {INPUTS[0]: sparse[i:i + batch_size],
                                                  INPUTS[1]: dense[i:i + batch_size]})[0]
                           for i in range(0, len(sparse), batch_size)])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def compile_booster(booster: Any, path: Path) -> Any:
    """``booster`` at its best iteration (the one LightGBM scores with here), written to ``path`` as LightGBM
    text and compiled by lleaves; ``.predict(matrix, n_jobs)`` returns LightGBM's probabilities. ImportError
    when lleaves is not installed (the ``dev`` extra)."""
    import lleaves

    booster.save_model(str(path), num_iteration=booster.best_iteration)
    model = lleaves.Model(model_file=str(path))
    model.compile()
    return model


def load_compact(compact_dir: Path, schema: Schema) -> tuple[nn.Module, Path | None]:
    """The compress stage's compact model (eval mode) and its ONNX file (None if absent); an ``EMMError`` saying
    why when there is none to load (not made, compress disabled, another schema)."""
    record_path = Path(compact_dir) / COMPACT_JSON
    if not record_path.is_file():
        raise EMMError(f"no {record_path}: run `emm compress` first")
    record = read_json(record_path)
    if "spec" not in record:
        raise EMMError(f"{record_path} holds no compact model ({record.get('note', 'compress made none')})")
    check_fingerprint(record["schema_fingerprint"], schema, f"compact model in {compact_dir}")
    model = build_compact_from_config(record["spec"], schema)
    load_module(model, Path(compact_dir) / COMPACT_WEIGHTS, what=f"compact model in {compact_dir}",
                fix="run `emm compress` again")
    onnx = Path(compact_dir) / COMPACT_ONNX
    return model.eval(), onnx if onnx.is_file() else None


def unpruned_fused(saved: nn.Module, meta: dict[str, Any], schema: Schema, work_dir: Path) -> tuple[nn.Module, bool]:
    """The saved fused model's architecture without its pruning, and whether its weights are the trained ones
    (the fuse stage's checkpoint in ``work_dir``) rather than the saved ones with the pruned parts at their
    initial values. See the module docstring."""
    arch = meta["architecture"]
    model = build_from_config({**arch, "fused": {k: v for k, v in arch["fused"].items() if k != "pruned"}}, schema)
    for built, loaded in zip(tree_members(model), tree_members(saved)):
        built.native = loaded.native  # tree members score as in the saved model (their library, where installed)
    checkpoint = Path(work_dir) / "checkpoint" / CHECKPOINT
    if checkpoint.is_file():
        try:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["best_model"])
            return model.eval(), True
        except (RuntimeError, KeyError, pickle.UnpicklingError):  # another architecture's, or not a checkpoint
            pass
    model.load_state_dict(saved.state_dict(), strict=False)
    return model.eval(), False


# ---- the run ------------------------------------------------------------------------------------------------
def raw_rows(cfg: Any, dataset: str, rows: int) -> pd.DataFrame:
    """The first ``rows`` rows of the dataset's raw test file, as text, in the declaration's columns."""
    spec = resolve_dataset(dataset, cfg.datasets)
    path = resolve_file(Path(cfg.paths.raw_root) / dataset, spec.files["test"])
    return pd.read_csv(path, header=None, names=spec.columns, sep=spec.delimiter, dtype=str, nrows=rows,
                       keep_default_na=False, skipinitialspace=True)


def fused_onnx(cfg: Any, dataset: str, model: nn.Module, schema: Schema,
               example: tuple[torch.Tensor, torch.Tensor], tmp: Path) -> tuple[Path, str]:
    """``export/fused.onnx`` if it was made from the current fused weights (and maps out-of-range indices, as
    every ``emm export`` file now does), else a fresh export of the same graph in ``tmp``."""
    export_dir, fused_dir = stage_dir(cfg, dataset, "export"), stage_dir(cfg, dataset, "fused")
    if (export_dir / EXPORT_JSON).is_file():
        record = read_json(export_dir / EXPORT_JSON)
        if record.get("fused_weights_sha256") == sha256_file(fused_dir / FUSED_WEIGHTS) \
                and record.get("sparse_out_of_range") == "unseen":
            return export_dir / ONNX_FILE, f"{export_dir / ONNX_FILE} (emm export)"
    export_onnx(UnseenGuard(model, schema), tmp / ONNX_FILE, example)
    return tmp / ONNX_FILE, "exported here (no export/ of these fused weights)"


def tree_members(fused: nn.Module) -> list[nn.Module]:
    """The fused model's tree members (none for an output head without donors)."""
    return list(fused.donors.trees) if getattr(fused, "donors", None) is not None else []


class TreesOnly(nn.Module):
    """The fused model's tree members alone, ``[B, n_trees]`` logits: their share of the fused model's time.
    ``walk``: score them by the torch walk (what the ONNX file runs, and a bundle without the library) rather
    than by their library (``emm.models.tree_native``)."""

    def __init__(self, fused: nn.Module, walk: bool) -> None:
        super().__init__()
        self.trees, self.use_walk = nn.ModuleList(tree_members(fused)), walk

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.walk(t.inputs(sparse, dense)).to(dense.dtype) if self.use_walk else t(sparse, dense)
                          for t in self.trees], dim=1)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def race(sides: dict[str, Callable[[], Any]], rounds: int, n: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per side over interleaved rounds (after one warm-up call each), and each side's output."""
    outputs = {k: fn() for k, fn in sides.items()}
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(rounds):
        for k, fn in sides.items():
            s, outputs[k] = timed(fn)
            seconds[k].append(s)
        print(f"  round {r + 1}: " + "  ".join(f"{k} {n / v[-1]:,.0f}/s" for k, v in seconds.items()), flush=True)
    return {k: statistics.median(v) for k, v in seconds.items()}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="census-income")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads for every side alike")
    parser.add_argument("--batch-size", type=int, default=SCORE_BATCH_ROWS,
                        help="rows per torch / onnxruntime call (default: the batch the served model scores in)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_params(args.params)
    data_dir = stage_dir(cfg, args.dataset, "data")
    schema = Schema.load(data_dir)
    encoder = Encoder.load(data_dir, schema)
    rows = raw_rows(cfg, args.dataset, args.rows)
    features = lightgbm_features(schema)[1]
    n, threads, batch = len(rows), args.threads, args.batch_size
    print(f"{args.dataset}: {n:,} raw test rows; {threads} threads each; batch {batch:,}")
    print(f"load before: {load_average()}")

    def encode() -> tuple[Any, np.ndarray]:
        encoded = encoder.transform(rows, source="raw rows", first_line=None)
        return frame_to_tensors(encoded, schema, with_labels=False), encoded[features].to_numpy(np.float64)

    encode_s = [timed(encode)[0] for _ in range(args.rounds)]
    tensors, matrix = encode()
    sparse, dense = tensors.sparse.numpy(), tensors.dense.numpy()
    example = (tensors.sparse[:64], tensors.dense[:64])
    sides: dict[str, Callable[[], Any]] = {}
    notes: list[str] = []
    extra: dict[str, Any] = {}

    def torch_side(model: nn.Module) -> Callable[[], Any]:
        return lambda: predict_proba(model, tensors, batch)

    def onnx_side(session: Any) -> Callable[[], Any]:
        return lambda: sigmoid(onnx_logits(session, sparse, dense, batch))

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        fused_dir = stage_dir(cfg, args.dataset, "fused")
        if (fused_dir / FUSED_JSON).is_file():
            fused, meta = load_fused(fused_dir, schema)
            path, where = fused_onnx(cfg, args.dataset, fused, schema, example, tmp)
            sides |= {"fused torch": torch_side(fused), "fused onnx": onnx_side(tuned_session(path, threads))}
            notes.append(f"fused ONNX file: {where}")
            if tree_members(fused):
                sides |= {TREES: torch_side(TreesOnly(fused, walk=False)),
                          TREES_WALK: torch_side(TreesOnly(fused, walk=True))}
                notes.append(f"fused model's tree members: {[t.name for t in tree_members(fused)]} "
                             f"({', '.join(str(t.n_trees) for t in tree_members(fused))} trees)")
            unpruned, trained = unpruned_fused(fused, meta, schema, stage_dir(cfg, args.dataset, "fused-work"))
            if unpruned.pruning != fused.pruning:
                export_onnx(UnseenGuard(unpruned, schema), tmp / "unpruned.onnx", example)
                sides |= {"unpruned torch": torch_side(unpruned),
                          "unpruned onnx": onnx_side(tuned_session(tmp / "unpruned.onnx", threads))}
                extra["unpruned"] = (fused, unpruned, trained, meta)
            else:
                notes.append("fused/ holds an unpruned model (pruning leaves nothing out): no unpruned side")
        else:
            notes.append(f"fused model left out: no {fused_dir / FUSED_JSON} (run `emm fuse`)")
        try:
            compact, compact_onnx = load_compact(stage_dir(cfg, args.dataset, "compact"), schema)
        except EMMError as exc:
            notes.append(f"compact model left out: {exc}")
        else:
            if compact_onnx is None:
                export_onnx(UnseenGuard(compact, schema), tmp / "compact.onnx", example)
                compact_onnx = tmp / "compact.onnx"
            notes.append(f"compact ONNX file: {compact_onnx}")
            sides |= {"compact torch": torch_side(compact),
                      "compact onnx": onnx_side(tuned_session(compact_onnx, threads)),
                      "compact onnx plain": onnx_side(onnx_session(compact_onnx, threads=threads))}
            extra["compact"] = compact
        boosters = [r["booster"] for r in lightgbm_per_task(data_dir, params={"num_threads": threads}).values()]
        sides[LGB] = lambda: np.stack([b.predict(matrix, num_iteration=b.best_iteration, num_threads=threads)
                                       for b in boosters], axis=1)
        try:
            compile_s, compiled = timed(lambda: [compile_booster(b, tmp / f"booster{i}.txt")
                                                 for i, b in enumerate(boosters)])
        except ImportError:
            notes.append("lleaves left out: not installed (pip install -e '.[dev]')")
        else:
            sides[LLEAVES] = lambda: np.stack([m.predict(matrix, n_jobs=threads) for m in compiled], axis=1)
            notes.append(f"lleaves: both boosters compiled in {compile_s:.1f}s "
                         f"({', '.join(str(b.best_iteration) for b in boosters)} trees)")
        med, outputs = race(sides, args.rounds, n)
    print(f"load after: {load_average()}")
    report(n, statistics.median(encode_s), med, outputs, notes, extra, tensors)


def report(n: int, enc: float, med: dict[str, float], outputs: dict[str, Any], notes: list[str],
           extra: dict[str, Any], tensors: Any) -> None:
    """The table (rows/s, vs LightGBM, end to end) and every goal's ratio."""
    for note in notes:
        print(note)
    lgb = med[LGB]
    print(f"encoding the raw rows (Encoder.transform + tensors + the trees' matrix), shared by all: "
          f"{n / enc:12,.0f} rows/s ({enc:.3f}s)")
    print(f"{'model':18s} {'score rows/s':>13s} {'vs LightGBM':>12s} {'with encoding':>14s} {'vs LightGBM':>12s}")
    for k, s in med.items():
        print(f"{k:18s} {n / s:13,.0f} {lgb / s:11.2f}x {n / (s + enc):14,.0f} {(lgb + enc) / (s + enc):11.2f}x")

    def diff(a: str, b: str) -> str:
        return f"{np.abs(outputs[a] - outputs[b]).max():.3g}"

    probe = (tensors.sparse[:1024], tensors.dense[:1024])
    if "fused torch" in med:
        print(f"fused: onnxruntime vs torch eager {med['fused torch'] / med['fused onnx']:.2f}x faster; max abs "
              f"probability difference {diff('fused onnx', 'fused torch')}")
    if TREES in med:
        lib, walk = med[TREES], med[TREES_WALK]
        print(f"fused's tree members: {lib / med['fused torch']:.0%} of the fused model's torch time (scored by their "
              f"library); by the torch walk (a bundle without the library) {walk / lib:.1f}x slower "
              "than by the library")
    if "unpruned" in extra:
        fused, unpruned, trained, meta = extra["unpruned"]
        cost, full = model_cost(fused, *probe), model_cost(unpruned, *probe)
        gain = {k: med[f"unpruned {k}"] / med[f"fused {k}"] for k in ("torch", "onnx")}
        same = (f"pruning the fuse stage's checkpoint gives the saved scores: max abs probability difference "
                f"{np.abs(predict_proba(prune(unpruned), tensors, 65536) - outputs['fused torch']).max():.3g}"
                if trained else "weights: the saved ones, the pruned parts at their initial values (no checkpoint)")
        print(f"pruned (saved) vs unpruned (as trained): {full.flops_per_row:,} -> {cost.flops_per_row:,} FLOPs per "
              f"row ({full.flops_per_row / max(cost.flops_per_row, 1):.1f}x fewer), {full.parameters:,} -> "
              f"{cost.parameters:,} parameters; {same}")
        print(f"  pruned vs unpruned: torch eager {gain['torch']:.2f}x faster, onnxruntime {gain['onnx']:.2f}x faster; "
              f"goal >= {PRUNED_GOAL_X:g}x: {'met' if min(gain.values()) >= PRUNED_GOAL_X else 'NOT met'}")
    if LLEAVES in med:
        print(f"lleaves vs LightGBM (same boosters, same matrix): {lgb / med[LLEAVES]:.2f}x faster; max abs "
              f"probability difference {diff(LLEAVES, LGB)}")
    if "compact" in extra:
        best = min(("compact torch", "compact onnx"), key=med.__getitem__)
        rate = n / med[best]
        print(f"compact: {model_cost(extra['compact'], *probe).flops_per_row:,} FLOPs per row; onnxruntime vs torch "
              f"eager {med['compact torch'] / med['compact onnx']:.2f}x faster, tuned vs plain session "
              f"{med['compact onnx plain'] / med['compact onnx']:.2f}x; max abs probability difference onnx-torch "
              f"{diff('compact onnx', 'compact torch')}")
        print(f"  goal: compact ({best}) >= {COMPACT_GOAL_X:g}x two LightGBM boosters: "
              f"{'met' if lgb / med[best] >= COMPACT_GOAL_X else 'NOT met'} ({lgb / med[best]:.2f}x)"
              + (f"; vs lleaves {med[LLEAVES] / med[best]:.2f}x" if LLEAVES in med else ""))
        print(f"  goal: >= {COMPACT_GOAL_ROWS:,} rows/s on these threads: {'met' if rate >= COMPACT_GOAL_ROWS else 'NOT met'} "
              f"({rate:,.0f}, {rate / COMPACT_GOAL_ROWS:.2f}x of it); moonshot {COMPACT_MOONSHOT_ROWS:,}: "
              f"{rate / COMPACT_MOONSHOT_ROWS:.2f}x of it ({COMPACT_MOONSHOT_ROWS / rate:.1f}x to go); with encoding "
              f"{n / (med[best] + enc):,.0f} rows/s")


if __name__ == "__main__":
    main()
