"""``emm export``: the fused model as an ONNX file, scored by onnxruntime, optionally logged to its registered version.

What is exported is the torch module itself, ``(sparse LongTensor [B, n_sparse], dense FloatTensor
[B, n_dense]) -> logits [B, T]`` with a dynamic batch axis (``torch.onnx.export``, the torch.export-based
exporter). Raw-row encoding (vocabularies, dense scaling) stays in Python: it is the same ``Encoder`` as
ingestion, and a second implementation inside the graph would drift from it.

Why it is checked before it is kept: an exporter can silently change numerics (an op lowered differently,
a shape specialised to the example batch). So the file is scored by onnxruntime on real validation rows,
in one batch of many rows and one of a single row (the dynamic axis), and compared with torch; a file is
written only when every logit agrees within ``LOGIT_ATOL + RTOL * |torch logit|`` and every probability
within ``TOLERANCE``. Why logits get a looser bound than probabilities: float32 is only that exact. A
confident model's logits are large (at magnitude 8 to 16 one float32 step is 2**-20, about 1e-6), a logit is the end of
several layers of float32 sums, and onnxruntime's kernels sum in another order than torch's, so both
are a few steps from the exact value and a pure 1e-5 bound on large logits would refuse correct exports.
The absolute part is wider because a fused model is many float32 layers deep (donor paths, AKF levels,
the periodic encoding's cos/sin of scaled dense values), each rounded differently by the two runtimes and
by different CPUs' kernels. Why ``TOLERANCE`` is ``LOGIT_ATOL / 4`` and not a number of its own: a
sigmoid's slope is at most 1/4 (at logit 0), so a probability bound tighter than that refuses logits the
logit bound accepts (one source of truth for how exact an export must be).

Why out-of-range indices are mapped inside the graph: the file is used without EMM (no encoder to keep the
indices in range), and ONNX's Gather reads -1 as the table's last row and an index past a feature's
vocabulary as another feature's row, so such rows would score silently as something else (past the whole
table, onnxruntime fails). ``UnseenGuard`` maps every index outside its column's block of the table
(``offset_j .. offset_j + vocab_size_j - 1``) to that column's unseen index, ``offset_j``, which is what the
encoder does with a value it never saw; in-range indices pass unchanged, so torch's scores still hold.

Tree members (LightGBM, XGBoost) are not traced: each becomes one ``ai.onnx.ml`` ``TreeEnsemble`` node built from
its ``TreeModel``'s own tensors (``emm.models.tree_onnx``: the walk's rule, NaN/zero/categorical codes included, the
leaves summed in double), spliced into the graph torch exported around it. onnxruntime scores it natively, so the
file is fast, needs neither library, and the same agreement check holds it (``tests/integration/test_fuse_trees.py``).

On disk: ``artifacts/<dataset>/export/`` (atomic) with ``fused.onnx`` (its metadata names the tasks, the
input columns and the schema fingerprint) and ``export.json`` (the check, the opset, where it came from).
Logged: when a registered version is named (``--model-uri models:/emm-<dataset>/N`` or ``@alias``), or by
default the ``challenger``, both files go to that version's run under ``export/``, but only if that
version is the model in ``fused/`` (the sha256 of the fused weights it was registered from; its fuse run
for versions without that tag): a version of another model would otherwise carry a file of this one.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emm.data.schema import Schema
from emm.data.tensors import SplitTensors, load_split
from emm.errors import EMMError
from emm.fusion.saved import FUSED_JSON, FUSED_WEIGHTS, load_fused
from emm.io import atomic_dir, digest, provenance, read_json, sha256_file, write_json
from emm.models.tree_onnx import DESCRIPTION as TREES_AS, splice_trees, trees_as_inputs
from emm.models.trees import TreeModel
from emm.pipeline.layout import stage_dir
from emm.pipeline.params import load_params

log = logging.getLogger(__name__)
FORMATS = ("onnx",)
ONNX_FILE, EXPORT_JSON = "fused.onnx", "export.json"
INPUTS, OUTPUT = ("sparse", "dense"), "logits"
LOGIT_ATOL = 2e-4     # max |difference| between onnxruntime and torch logits: this much (see above) ...
RTOL = 1e-5           # ... plus this much of the logit's magnitude
TOLERANCE = LOGIT_ATOL / 4  # probabilities: what the logit bound allows where a sigmoid is steepest
CHECK_ROWS = 4096     # validation rows the check scores
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


@dataclass
class ExportReport:
    path: Path
    max_abs_diff: float               # logits, onnxruntime vs torch, on the checked rows
    max_abs_diff_probability: float
    rows_checked: int
    seconds: float
    version: str | None = None        # the registered version the files were logged to
    run_id: str | None = None
    note: str = ""                    # why nothing was logged, when nothing was


# ---- the file ------------------------------------------------------------------------------------------------
class UnseenGuard(nn.Module):
    """``model`` with every sparse index outside its column's block of the table replaced by that column's
    unseen index (``torch.where`` on per-column bounds: exported as plain comparisons, no control flow)."""

    def __init__(self, model: nn.Module, schema: Schema) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("low", torch.tensor([f.offset for f in schema.sparse], dtype=torch.long))
        self.register_buffer("high", torch.tensor([f.offset + f.vocab_size for f in schema.sparse], dtype=torch.long))

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        inside = (sparse >= self.low) & (sparse < self.high)
        return self.model(torch.where(inside, sparse, self.low), dense)


def _onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise EMMError("`emm export --format onnx` needs the onnx and onnxruntime packages: "
                       "pip install -e . (they are EMM dependencies)") from exc
    return onnx, onnxruntime


def export_onnx(model: nn.Module, path: Path, example: tuple[torch.Tensor, torch.Tensor], *,
                metadata: dict[str, str] | None = None) -> int:
    """Write ``model`` (``(sparse, dense) -> logits``) as one ONNX file with a dynamic batch axis; returns
    the opset. ``example`` fixes everything but the batch size (at least 2 rows, so that the exporter
    does not specialise the batch to 1)."""
    onnx, _ = _onnx()
    sparse, dense = example
    if len(sparse) < 2:
        raise EMMError(f"the export example needs at least 2 rows, got {len(sparse)}")
    batch = torch.export.Dim("batch")
    model.eval()
    # torch.onnx warns about every torchvision op it cannot register; onnxscript's optimizer logs each rewrite
    noisy = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")]
    levels = [n.level for n in noisy]
    for logger in noisy:
        logger.setLevel(logging.ERROR)
    try:  # tree members leave the trace as graph inputs/outputs, then join as TreeEnsemble nodes (splice_trees)
        with torch.no_grad(), warnings.catch_warnings(), trees_as_inputs(model) as trees:
            warnings.simplefilter("ignore", (FutureWarning, UserWarning))  # the exporter's own deprecation notes
            logits, tree_inputs = trees.names() if trees is not None else ([], [])
            args = (sparse, dense, *(trees.example(len(sparse)) if trees is not None else ()))
            shapes = ({0: batch}, {0: batch}, *([tuple({0: batch} for _ in logits)] if logits else []))  # *logits
            program = torch.onnx.export(trees if trees is not None else model, args, dynamo=True,
                                        input_names=[*INPUTS, *logits], output_names=[OUTPUT, *tree_inputs],
                                        dynamic_shapes=shapes, verbose=False)
    finally:
        for logger, level in zip(noisy, levels):
            logger.setLevel(level)
    proto = program.model_proto
    if trees is not None:
        splice_trees(proto, trees)
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return int(next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")))


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session on ``path`` (``threads``: intra-op threads, default torch's count).

    Not ``session.set_denormal_as_zero``, although it scores faster when a model's products fall below float32's
    smallest normal number: onnxruntime sets it on the calling thread for the rest of the process, so every torch
    computation after the session (a flow runs its stages in one process) would flush denormals too. The compact
    model's tiny weights are zeroed at the source instead (``emm.train.compact.flush_tiny_weights``)."""
    _, ort = _onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise EMMError(f"onnxruntime cannot load {path}: {exc}") from exc


def onnx_logits(session: Any, sparse: np.ndarray, dense: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Logits [N, T] from an exported model, batch by batch."""
    out = [session.run([OUTPUT], {INPUTS[0]: sparse[i:i + batch_size], INPUTS[1]: dense[i:i + batch_size]})[0]
           for i in range(0, len(sparse), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def compare(model: nn.Module, session: Any, sparse: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    """torch vs onnxruntime on the rows, scored as one batch and row 0 alone again: the largest absolute
    logit and probability differences, and the largest logit difference relative to the bound
    ``LOGIT_ATOL + RTOL * |torch logit|`` (<= 1 passes)."""
    with torch.no_grad():
        ref = model.eval()(sparse, dense).numpy()
    got = onnx_logits(session, sparse.numpy(), dense.numpy())
    one = onnx_logits(session, sparse[:1].numpy(), dense[:1].numpy())
    if got.shape != ref.shape or one.shape != ref[:1].shape:
        raise EMMError(f"the ONNX model returns logits of shape {got.shape} (and {one.shape} for one row) where "
                       f"torch returns {ref.shape}")
    got, ref = np.concatenate([got, one]).astype(np.float64), np.concatenate([ref, ref[:1]]).astype(np.float64)
    diff = np.abs(got - ref)
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    return {"max_abs_diff": float(diff.max(initial=0.0)),
            "max_abs_diff_probability": float(np.abs(sigmoid(got) - sigmoid(ref)).max(initial=0.0)),
            "bound_used": float((diff / (LOGIT_ATOL + RTOL * np.abs(ref))).max(initial=0.0))}


def agrees(check: dict[str, float]) -> bool:
    """Whether a ``compare`` result is within both bounds (NaN is not)."""
    return bool(check["bound_used"] <= 1 and check["max_abs_diff_probability"] <= TOLERANCE)


def check_rows_of(data_dir: Path, schema: Schema, rows: int = CHECK_ROWS) -> SplitTensors:
    """The validation rows an export is checked on (at least 2)."""
    checked = load_split(data_dir, "val", schema).head(rows)
    if len(checked) < 2:
        raise EMMError(f"{data_dir}/val.parquet has {len(checked)} row(s); the export check needs at least 2")
    return checked


def export_checked(model: nn.Module, schema: Schema, rows: SplitTensors, path: Path, *, dataset: str,
                   tasks: list[str], what: str = "model") -> dict[str, Any]:
    """Write ``model`` behind its ``UnseenGuard`` to ``path`` and check it against torch on ``rows``
    (``compare``, ``agrees``); an ``EMMError`` when they disagree (the caller writes into a temporary
    folder, so nothing is kept then). Returns the record's export part: the file, opset, inputs and
    output, the check. The one export of every EMM model (fused, compact), so both are held to one bound."""
    metadata = {"emm.dataset": dataset, "emm.model": what, "emm.tasks": ",".join(tasks),
                "emm.sparse_columns": ",".join(f.name for f in schema.sparse),
                "emm.dense_columns": ",".join(f.name for f in schema.dense),
                "emm.schema_fingerprint": schema.fingerprint(), "emm.outputs": "logits (apply a sigmoid)",
                "emm.sparse_out_of_range": "scored as the column's unseen index (its offset)"}
    trees = [m.name for m in model.modules() if isinstance(m, TreeModel)]
    if trees:
        metadata["emm.trees"] = f"{','.join(trees)}: {TREES_AS}"
    opset = export_onnx(UnseenGuard(model, schema), path, (rows.sparse[:64], rows.dense[:64]), metadata=metadata)
    check = compare(model, onnx_session(path), rows.sparse, rows.dense)
    if not agrees(check):
        raise EMMError(f"the exported {what} disagrees with torch on {len(rows)} validation rows: logits differ by up "
                       f"to {check['max_abs_diff']:.3g} ({check['bound_used']:.2f}x the bound {LOGIT_ATOL:g} + "
                       f"{RTOL:g}*|logit|), probabilities by {check['max_abs_diff_probability']:.3g} (bound "
                       f"{TOLERANCE:g}); the file was not written")
    return {"format": "onnx", "file": Path(path).name, "opset": opset,
            "inputs": {INPUTS[0]: ["batch", schema.n_sparse, "int64"], INPUTS[1]: ["batch", schema.n_dense, "float32"]},
            "output": {OUTPUT: ["batch", len(tasks), "float32"]}, "tasks": list(tasks),
            "sparse_out_of_range": "unseen",  # UnseenGuard: scored as the column's unseen index
            **({"trees": {"members": trees, "as": TREES_AS}} if trees else {}),
            "schema_fingerprint": schema.fingerprint(),
            "check": {"rows": len(rows), **check, "atol": LOGIT_ATOL, "rtol": RTOL, "probability_atol": TOLERANCE},
            "torch": torch.__version__, "onnxruntime": _onnx()[1].__version__}


def export_fused(dataset: str, data_dir: Path, fused_dir: Path, out_dir: Path, *,
                 check_rows: int = CHECK_ROWS) -> tuple[ExportReport, dict[str, Any]]:
    """Export ``fused/`` to ``out_dir/fused.onnx`` (+ ``export.json``), checked against torch on
    validation rows; nothing is written when the check fails. Returns the report and fused.json."""
    if not (Path(fused_dir) / FUSED_JSON).is_file():
        raise EMMError(f"no fused model in {fused_dir}: run `emm fuse {dataset}` first")
    started = time.perf_counter()
    schema = Schema.load(data_dir)
    model, meta = load_fused(fused_dir, schema)
    rows = check_rows_of(data_dir, schema, check_rows)
    with atomic_dir(out_dir) as tmp:
        exported = export_checked(model, schema, rows, tmp / ONNX_FILE, dataset=dataset, tasks=model.task_names,
                                  what="fused model")
        check = exported["check"]
        record = {"dataset": dataset, **exported, "fused_run_id": meta.get("mlflow_run_id"),
                  "fused_weights_sha256": sha256_file(Path(fused_dir) / FUSED_WEIGHTS)}
        record["provenance"] = provenance(digest(record))
        write_json(tmp / EXPORT_JSON, record)
    report = ExportReport(Path(out_dir) / ONNX_FILE, check["max_abs_diff"], check["max_abs_diff_probability"],
                          len(rows), time.perf_counter() - started)
    return report, meta


# ---- the registered version ----------------------------------------------------------------------------------
def parse_model_uri(uri: str, dataset: str) -> tuple[str, str | None, str | None]:
    """``models:/emm-<dataset>/N`` or ``models:/emm-<dataset>@alias`` -> (name, version, alias)."""
    from emm.tracking.store import registered_name

    match = _MODEL_URI.match(uri.strip())
    if not match:
        raise EMMError(f"--model-uri {uri!r} does not name a registered version: the export is logged to a version's "
                       f"run, so pass models:/{registered_name(dataset)}/<version> or models:/{registered_name(dataset)}@<alias>")
    name = match["name"]
    if name != registered_name(dataset):
        raise EMMError(f"--model-uri {uri!r} is a version of {name!r}, but dataset {dataset!r} registers "
                       f"{registered_name(dataset)!r}")
    return name, match["version"], match["alias"]


def registered_from(version: Any, weights_sha256: str, fused_run: str | None) -> bool:
    """Whether a registry version is the model in ``fused/``: by the sha256 of the fused weights it was
    registered from (its tag; evaluating the same weights again reuses the version, so its run may be an
    older fuse run), or, for a version without that tag, by the fuse run."""
    from emm.tracking import registry

    tagged = (getattr(version, "tags", None) or {}).get(registry.DIGEST_TAG)
    if tagged:
        return tagged == weights_sha256
    return bool(fused_run) and version.run_id == fused_run


def target_version(dataset: str, store: Path, fused_dir: Path, model_uri: str | None) -> tuple[Any, str]:
    """The registered version to log the export to, and a note when there is none.

    Named (``model_uri``): it must exist and be the model in ``fused/`` (``registered_from``), else an
    error. Default: the challenger, under the same condition; when it is missing or another model, only
    a note (the file is still exported). Checked before anything is written.
    """
    from emm.tracking import registry
    from emm.tracking.store import registered_name

    name = registered_name(dataset)
    fused_run = read_json(Path(fused_dir) / FUSED_JSON).get("mlflow_run_id")
    weights = sha256_file(Path(fused_dir) / FUSED_WEIGHTS)
    if model_uri is not None:
        _, number, alias = parse_model_uri(model_uri, dataset)
        registry.require_model(name, store, fix=f"run `emm evaluate {dataset}` first (it registers the fused model)")
        version = registry.get_version(name, number) if number else registry.version_by_alias(name, alias or "")
        if version is None:
            raise EMMError(f"{name!r} has no alias {alias!r}")
        if not registered_from(version, weights, fused_run):
            raise EMMError(f"{model_uri} (version {version.version}, run {version.run_id}) is not the model in "
                           f"fused/ (run {fused_run}): the export would not be that version's model. Name the "
                           f"version fused/ was registered as (or fuse and evaluate again)")
        return version, ""
    if not (Path(store) / "mlflow.db").is_file():
        return None, f"not logged: no MLflow store at {store}"
    try:
        registry.require_model(name, store, fix="")
    except EMMError:
        return None, f"not logged: {name!r} has no registered version yet (run `emm evaluate {dataset}`)"
    version = registry.version_by_alias(name, registry.CHALLENGER)
    if version is None:
        return None, f"not logged: {name!r} has no {registry.CHALLENGER!r} version; name one with --model-uri"
    if not registered_from(version, weights, fused_run):
        return None, (f"not logged: the challenger (version {version.version}) is not the model in fused/ (run "
                      f"{fused_run}); run `emm evaluate {dataset}` to register it, or name its version with "
                      f"--model-uri")
    return version, ""


def log_to_version(dataset: str, store: Path, version: Any, out_dir: Path) -> tuple[str, str]:
    """Log ``fused.onnx`` and ``export.json`` to the version's run under ``export/``: (version, run id)."""
    from emm.tracking.runs import reopen_run

    with reopen_run(dataset, store, version.run_id, "export") as tracker:
        tracker.log_artifact(Path(out_dir) / ONNX_FILE, "export")
        tracker.log_artifact(Path(out_dir) / EXPORT_JSON, "export")
    log.debug("logged %s to version %s (run %s) under export/", ONNX_FILE, version.version, version.run_id)
    return str(version.version), version.run_id


def export_stage(dataset: str, params: Path | str | None = None, *, fmt: str = "onnx", model_uri: str | None = None,
                 log_model: bool = True) -> ExportReport:
    """Export ``artifacts/<dataset>/fused/`` to ``artifacts/<dataset>/export/`` and log it to its version."""
    if fmt not in FORMATS:
        raise EMMError(f"unknown export format {fmt!r}; supported: {', '.join(FORMATS)}")
    if model_uri is not None and not log_model:
        raise EMMError("--model-uri names the version to log the export to, and --no-log says not to log: pick one")
    cfg = load_params(params)
    fused_dir, out_dir = stage_dir(cfg, dataset, "fused"), stage_dir(cfg, dataset, "export")
    if not (fused_dir / FUSED_JSON).is_file():
        raise EMMError(f"no fused model in {fused_dir}: run `emm fuse {dataset}` first")
    version, note = (None, "not logged (--no-log)")
    if log_model:
        version, note = target_version(dataset, cfg.tracking.store, fused_dir, model_uri)
    report, _ = export_fused(dataset, stage_dir(cfg, dataset, "data"), fused_dir, out_dir)
    report.note = note
    if version is not None:
        report.version, report.run_id = log_to_version(dataset, cfg.tracking.store, version, out_dir)
    return report
