"""``emm export --format onnx``: the fused model as an ONNX file that onnxruntime scores like torch.

On a tiny registry built by the real CLI (``tiny_registry``: two fuses of one pool, versions 1 and 2,
``@challenger`` on 2, ``fused/`` from the second fuse), the export must
- write ``export/fused.onnx`` whose onnxruntime outputs equal torch's on the test rows at any batch size
  (one row, seven, all): probabilities within 1e-5, logits within 1e-5 + 1e-5*|logit| (float32 rounding
  of large logits; ``emm.pipeline.export``), the max abs differences printed;
- be logged to the challenger's run (the version ``fused/`` was registered as) under ``export/``;
- refuse, before writing anything, a named version that another fuse made, a URI that names no version,
  and an unknown format.
A second fused variant (donor paths kept whole, the pool's own embeddings) is exported through the
library function: the ops it adds (the donors' DCN and residual blocks, the blend) must export too.
On a smaller fused model (``tiny_fused``), the file must score a sparse index outside its column's block of
the table as that column's unseen index, inside the graph (the file is used without EMM's encoder).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.fusion.saved import load_fused
from emm.pipeline.export import EXPORT_JSON, LOGIT_ATOL, ONNX_FILE, RTOL, TOLERANCE, export_fused, onnx_logits, onnx_session
from emm.io import read_json
from tests.integration.test_mlflow_ui_promote import DATASET, MODEL, emm, tiny_registry  # noqa: F401 (fixture)
from tests.integration.test_registry_atomic import tiny_fused  # noqa: F401 (fixture)


def emm_fails(args: list[str], registry) -> str:  # noqa: ANN001 - the Registry of the fixture
    """Run the CLI expecting a user error: exit 2, no traceback; returns stderr."""
    out = subprocess.run([str(Path(sys.executable).parent / "emm"), *args, "--params", str(registry.params)],
                         cwd=registry.project, env=registry.env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 2, f"expected exit 2, got {out.returncode}:\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return " ".join(out.stderr.split())


def torch_vs_onnx(fused_dir: Path, onnx_path: Path, data_dir: Path) -> tuple[float, float]:
    """(max |torch - onnxruntime| logit, max |difference| of probabilities) over the whole test split, in one
    batch, in batches of 7 and row by row for the first rows (the dynamic batch axis); asserts the bounds."""
    schema = Schema.load(data_dir)
    model, _ = load_fused(fused_dir, schema)
    test = load_split(data_dir, "test", schema)
    with torch.no_grad():
        ref = model(test.sparse, test.dense).numpy()
    session = onnx_session(onnx_path, threads=1)
    whole = onnx_logits(session, test.sparse.numpy(), test.dense.numpy())
    sevens = onnx_logits(session, test.sparse.numpy(), test.dense.numpy(), batch_size=7)
    singles = np.concatenate([onnx_logits(session, test.sparse[i:i + 1].numpy(), test.dense[i:i + 1].numpy())
                              for i in range(20)])
    assert whole.shape == ref.shape == (len(test), len(schema.task_names)) and whole.dtype == np.float32
    assert np.isfinite(whole).all() and ref.std(0).min() > 1e-3  # real scores, not a constant
    got = np.concatenate([whole, sevens, singles]).astype(np.float64)
    want = np.concatenate([ref, ref, ref[:20]]).astype(np.float64)
    logit_diff = np.abs(got - want)
    assert (logit_diff <= LOGIT_ATOL + RTOL * np.abs(want)).all(), logit_diff.max()
    prob_diff = float(np.abs(1 / (1 + np.exp(-got)) - 1 / (1 + np.exp(-want))).max())
    assert prob_diff <= TOLERANCE
    return float(logit_diff.max()), prob_diff


@pytest.mark.slow
def test_cli_export_matches_torch_and_is_logged_to_the_challenger(tiny_registry):
    reg = tiny_registry
    said = " ".join(emm(["export", DATASET, "--format", "onnx", "--params", str(reg.params)], reg.env, reg.project,
                        timeout=600).split())
    art = reg.project / "artifacts" / "tiny" / DATASET
    onnx_path = art / "export" / ONNX_FILE
    assert f"exported artifacts/tiny/{DATASET}/export/{ONNX_FILE}" in said and "logged to version 2" in said, said
    assert "INFO" not in said and "torchvision" not in said  # the exporter's own log lines are kept quiet
    record = read_json(art / "export" / EXPORT_JSON)
    assert record["check"]["bound_used"] <= 1 and record["check"]["max_abs_diff_probability"] <= TOLERANCE
    assert record["tasks"] == ["income", "marital"] and record["inputs"]["sparse"][0] == "batch"

    logits, probs = torch_vs_onnx(art / "fused", onnx_path, reg.data_dir)
    print(f"onnxruntime vs torch on the test split: max abs difference {logits:.3g} (logits), {probs:.3g} "
          f"(probabilities)")

    client = mlflow.MlflowClient(tracking_uri=reg.uri, registry_uri=reg.uri)
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert str(version.version) == "2" and version.run_id == read_json(art / "fused" / "fused.json")["mlflow_run_id"]
    assert version.tags["fused_sha256"] == record["fused_weights_sha256"]
    logged = sorted(a.path for a in client.list_artifacts(version.run_id, "export"))
    assert logged == [f"export/{EXPORT_JSON}", f"export/{ONNX_FILE}"]
    local = client.download_artifacts(version.run_id, f"export/{ONNX_FILE}", str(reg.project / "downloaded"))
    assert Path(local).read_bytes() == onnx_path.read_bytes()
    other = client.get_model_version(MODEL, "1")
    assert not client.list_artifacts(other.run_id, "export")  # only the version the file is

    before = onnx_path.read_bytes()
    err = emm_fails(["export", DATASET, "--model-uri", f"models:/{MODEL}/1"], reg)
    assert "version 1" in err and "is not the model in fused/" in err
    assert onnx_path.read_bytes() == before  # refused before anything was written
    assert "does not name a registered version" in emm_fails(["export", DATASET, "--model-uri", "runs:/abc/model"], reg)
    assert "is a version of 'emm-other'" in emm_fails(["export", DATASET, "--model-uri", "models:/emm-other/1"], reg)
    assert "has no version 9" in emm_fails(["export", DATASET, "--model-uri", f"models:/{MODEL}/9"], reg)
    assert "unknown export format 'tflite'" in emm_fails(["export", DATASET, "--format", "tflite"], reg)
    assert "no fused model" in emm_fails(["export", "ali-ccp"], reg)


@pytest.mark.slow
def test_donor_residual_reuse_variant_exports_exactly(tiny_registry, tmp_path):
    from emm.pipeline.fuse import fuse
    from emm.pipeline.params import load_params

    reg = tiny_registry
    cfg = load_params(reg.params)
    art = reg.project / "artifacts" / "tiny" / DATASET
    fuse_cfg = cfg.fuse.model_copy(update={"output": "donor_residual", "embedding": "reuse",
                                           "train": cfg.fuse.train.model_copy(update={"max_epochs": 1})})
    fuse(DATASET, reg.data_dir, art / "pool", art / "components", tmp_path / "fused", tmp_path / "work",
         fuse_cfg, cfg.decompose, progress=False)
    report, meta = export_fused(DATASET, reg.data_dir, tmp_path / "fused", tmp_path / "export")
    assert meta["architecture"]["fused"]["options"]["output"] == "donor_residual"
    assert report.max_abs_diff_probability <= TOLERANCE and report.rows_checked > 100
    logits, probs = torch_vs_onnx(tmp_path / "fused", tmp_path / "export" / ONNX_FILE, reg.data_dir)
    print(f"donor_residual/reuse, onnxruntime vs torch on the test split: max abs difference {logits:.3g} "
          f"(logits), {probs:.3g} (probabilities)")


def test_out_of_range_indices_score_as_unseen(tiny_fused, tmp_path):  # noqa: F811 (fixture)
    """The file stands alone: an index outside its column's block of the one table (-1, the previous feature's
    last index, the next feature's first, past the whole table) scores exactly as that column's unseen index
    (its offset), inside onnxruntime, while in-range rows keep torch's scores."""
    report, _ = export_fused(DATASET, tiny_fused.data_dir, tiny_fused.fused_dir, tmp_path / "export")
    assert report.max_abs_diff_probability <= TOLERANCE
    schema = Schema.load(tiny_fused.data_dir)
    rows = load_split(tiny_fused.data_dir, "test", schema).head(16)
    sparse, dense = rows.sparse.numpy(), rows.dense.numpy()
    offset = np.array([f.offset for f in schema.sparse], dtype=np.int64)
    end = offset + np.array([f.vocab_size for f in schema.sparse], dtype=np.int64)  # one past each column
    session = onnx_session(tmp_path / "export" / ONNX_FILE, threads=1)
    columns = np.arange(schema.n_sparse)
    unseen = sparse.copy()
    unseen[:, columns] = offset
    want = onnx_logits(session, unseen, dense)
    model, _ = load_fused(tiny_fused.fused_dir, schema)
    with torch.no_grad():
        torch_unseen = model(torch.from_numpy(unseen), torch.from_numpy(dense)).numpy()
    np.testing.assert_allclose(want, torch_unseen, rtol=RTOL, atol=LOGIT_ATOL)
    bad_values = {"-1": np.full_like(offset, -1), "offset - 1": offset - 1, "offset + vocab": end,
                  "past the table": np.full_like(offset, schema.total_vocab + 7), "huge": np.full_like(offset, 2 ** 62)}
    for kind, values in bad_values.items():
        bad = sparse.copy()
        bad[:, columns] = values
        np.testing.assert_array_equal(onnx_logits(session, bad, dense), want, err_msg=kind)
    # one bad column at a time: the others keep their own values
    for j in (0, schema.n_sparse // 2, schema.n_sparse - 1):
        bad, expected = sparse.copy(), sparse.copy()
        bad[:, j], expected[:, j] = end[j], offset[j]
        np.testing.assert_array_equal(onnx_logits(session, bad, dense), onnx_logits(session, expected, dense))
