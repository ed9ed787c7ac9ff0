"""``emm predict`` on raw Census rows as users have them: the UCI file itself (headerless, gzipped, integer
dense values), a CSV with the ingested names, a 1-row CSV, int64 / float / string Parquet; the same rows
must score the same whatever their dtype, through ``emm predict`` and through ``mlflow.pyfunc`` alike,
and exactly like the model on ingestion's own encoding of those rows. Also: the rejects file."""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from emm.data.encoding import Encoder
from emm.data.reader import iter_chunks
from emm.data.schema import Schema
from emm.data.spec import resolve_dataset
from emm.data.tensors import frame_to_tensors
from emm.errors import EMMError
from emm.models.pool import build_from_config
from emm.pipeline.predict import predict_stage
from emm.tracking.pyfunc import BUILDERS, log_scorer, raw_example
from emm.tracking.store import configure, use_experiment
from emm.weights import save_module
from tests.conftest import REPO

MODEL = "emm-census-income"
ROWS = 60
SPEC = {"name": "income-mlp", "task": "income", "arch": "mlp", "hidden": [16, 8]}


def log_untrained_model(data_dir: Path, store: Path, work: Path, seed: int = 0) -> tuple[str, torch.nn.Module]:
    """Register a seeded, untrained pool model as the next version of emm-census-income.

    Untrained on purpose: scoring is what is tested, and random embeddings make every sparse index and
    dense value move the score, so a value encoded differently could not go unnoticed."""
    schema = Schema.load(data_dir)
    torch.manual_seed(seed)
    model = build_from_config(SPEC, schema).eval()
    work.mkdir(parents=True, exist_ok=True)
    save_module(model, work / "weights.safetensors")
    use_experiment("census-income", store)
    with mlflow.start_run():
        info = log_scorer("model", builder=BUILDERS[0], config=SPEC, outputs=["income"],
                          weights=work / "weights.safetensors", data_dir=data_dir,
                          input_example=raw_example(data_dir), registered_name=MODEL)
    return f"models:/{MODEL}/{info.registered_model_version}", model


@contextlib.contextmanager
def logged_in_store(data_dir: Path, root: Path) -> Iterator[tuple[Path, str, torch.nn.Module]]:
    """(params.yaml, model uri, model): ``log_untrained_model`` into ``root/mlruns`` with MLFLOW_TRACKING_URI
    unset while the block runs, and the params file ``emm predict --params`` reads to find that registry."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri, model = log_untrained_model(data_dir, root / "mlruns", root / "work")
        params = root / "params.yaml"
        params.write_text(f"tracking:\n  store: {root / 'mlruns'}\n")
        yield params, uri, model


@pytest.fixture(scope="module")
def logged(census_small_data, tmp_path_factory):
    with logged_in_store(census_small_data, tmp_path_factory.mktemp("predict-raw")) as found:
        yield found


@pytest.fixture(scope="module")
def raw_file(census_small_raw, tmp_path_factory) -> Path:
    """The first ROWS lines of the real UCI test file, untouched: no header, ', ' separated, gzipped."""
    path = tmp_path_factory.mktemp("raw-rows") / "census-income.test.gz"
    with gzip.open(census_small_raw / "census-income.test.gz", "rt") as src, gzip.open(path, "wt") as dst:
        for _, line in zip(range(ROWS), src):
            dst.write(line)
    return path


def ingestion_scores(raw: Path, data_dir: Path, model: torch.nn.Module) -> np.ndarray:
    """The reference: the rows read and encoded exactly as `emm ingest` reads and encodes raw files."""
    spec = resolve_dataset("census-income")
    schema = Schema.load(data_dir)
    encoder = Encoder.load(data_dir, schema)
    frame = pd.concat([c.frame for c in iter_chunks(spec, raw, 1 << 20)], ignore_index=True)
    tensors = frame_to_tensors(encoder.transform(frame, source=str(raw), first_line=1), schema, with_labels=False)
    with torch.no_grad():
        return torch.sigmoid(model(tensors.sparse, tensors.dense)).numpy()[:, 0]


def as_pandas_reads_it(raw: Path) -> pd.DataFrame:
    """The raw rows as a user's pandas gives them: int64 dense columns (age 73, ...), str elsewhere."""
    columns = resolve_dataset("census-income").columns
    return pd.read_csv(raw, header=None, names=columns, skipinitialspace=True)


def test_raw_rows_score_alike_in_every_dtype_and_layout(logged, census_small_data, raw_file, tmp_path):
    params, uri, model = logged
    expected = ingestion_scores(raw_file, census_small_data, model)
    frame = as_pandas_reads_it(raw_file)
    dense = [f.name for f in Schema.load(census_small_data).dense]
    assert (frame[dense].dtypes == np.int64).all()  # age 73, weeks_worked 52: integers, as in the UCI file
    files = {name: tmp_path / name for name in
             ("named-int.csv", "one-row.csv", "int64.parquet", "float.parquet", "strings.parquet", "padded.csv")}
    frame.to_csv(files["named-int.csv"], index=False)
    frame.head(1).to_csv(files["one-row.csv"], index=False)
    frame.to_parquet(files["int64.parquet"])
    frame.astype({c: float for c in dense}).to_parquet(files["float.parquet"])
    frame.astype(str).to_parquet(files["strings.parquet"])
    frame.astype(str).map(lambda v: f" {v} ").to_csv(files["padded.csv"], index=False)  # hand-made spacing
    inputs = {"uci-file-headerless": raw_file, **files}
    for name, path in inputs.items():
        report = predict_stage(uri, path, tmp_path / f"{name}.out.csv", params)
        out = pd.read_csv(report.output)
        n = 1 if name == "one-row.csv" else ROWS
        assert (report.scored, report.rejected, report.headerless) == (n, 0, name.startswith("uci")), name
        assert out["row"].tolist() == list(range(1, n + 1)), name
        np.testing.assert_allclose(out["score_income"].to_numpy(), expected[:n], rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    # MLflow's own loader takes the same frames in any dtype and gives the same scores
    configure(params.parent / "mlruns")
    pyfunc = mlflow.pyfunc.load_model(uri)
    for frame_in in (frame, frame.astype({c: float for c in dense}), frame.astype(str), frame.head(1)):
        got = pyfunc.predict(frame_in)["score_income"].to_numpy()
        np.testing.assert_allclose(got, expected[:len(frame_in)], rtol=1e-6, atol=1e-7)


def test_categorical_codes_stored_as_floats_find_their_vocabulary(logged, census_small_data, raw_file, tmp_path):
    """``det_ind_code`` 4 read back as 4.0 (a float Parquet column) is the raw value '4', not an unseen one."""
    params, uri, model = logged
    frame = as_pandas_reads_it(raw_file)
    codes = ["det_ind_code", "det_occ_code", "own_or_self", "vet_benefits", "year"]
    assert all(frame[c].dtype == np.int64 for c in codes)
    frame.astype({c: float for c in codes}).to_parquet(tmp_path / "codes.parquet")
    predict_stage(uri, tmp_path / "codes.parquet", tmp_path / "out.csv", params)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "out.csv")["score_income"].to_numpy(),
                               ingestion_scores(raw_file, census_small_data, model), rtol=1e-6, atol=1e-7)


def test_emm_predict_cli_scores_the_uci_file(logged, census_small_data, raw_file, tmp_path):
    """The real console script (a fresh process, this checkout's code) on the raw UCI file as downloaded."""
    params, uri, model = logged
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    out = subprocess.run([str(Path(sys.executable).parent / "emm"), "predict", "--model-uri", uri, "--input",
                          str(raw_file), "--output", str(tmp_path / "scores.parquet"), "--params", str(params)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "has no header row" in out.stdout and f"scored {ROWS} rows" in out.stdout
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    np.testing.assert_allclose(scores["score_income"].to_numpy(), ingestion_scores(raw_file, census_small_data, model),
                               rtol=1e-6, atol=1e-7)


def test_a_file_that_is_neither_named_nor_the_raw_layout_is_refused(logged, raw_file, tmp_path):
    params, uri, _ = logged
    frame = as_pandas_reads_it(raw_file)
    frame.drop(columns=["year"]).to_csv(tmp_path / "short.csv", index=False, header=False)  # 41 unnamed fields
    with pytest.raises(EMMError, match=r"input lacks required column\(s\) .*or no header row and the 42 columns "
                                       r"of the dataset's declaration in order"):
        predict_stage(uri, tmp_path / "short.csv", tmp_path / "out.csv", params)


def test_clean_rerun_removes_stale_rejects(logged, census_small_data, tmp_path):
    params, uri, _ = logged
    rows = raw_example(census_small_data, rows=10).astype(str)
    bad = rows.copy()
    bad.loc[2, "age"] = "old"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    rows.to_csv(tmp_path / "good.csv", index=False)
    out, rejects = tmp_path / "scores.csv", tmp_path / "scores.rejected.csv"
    first = predict_stage(uri, tmp_path / "bad.csv", out, params)
    assert first.rejects == rejects and pd.read_csv(rejects)["row"].tolist() == [3]
    second = predict_stage(uri, tmp_path / "good.csv", out, params)
    assert (second.scored, second.rejected, second.rejects) == (10, 0, None)
    assert not rejects.exists()  # else it would pass for this run's rejects
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "good.csv", "scores.csv"]


def test_rejects_file_is_written_atomically(logged, census_small_data, tmp_path, monkeypatch):
    """A run that dies while writing its rejects leaves the previous rejects file whole, and no temp file."""
    params, uri, _ = logged
    rows = raw_example(census_small_data, rows=10).astype(str)
    rows.loc[4, "age"] = ""
    rows.to_csv(tmp_path / "in.csv", index=False)
    out, rejects = tmp_path / "scores.csv", tmp_path / "scores.rejected.csv"
    before = predict_stage(uri, tmp_path / "in.csv", out, params).rejects.read_text()
    real_to_csv = pd.DataFrame.to_csv

    def dies_halfway(self, path_or_buf=None, *args, **kwargs):
        if path_or_buf is not None and ".rejected.csv" in str(path_or_buf):
            Path(path_or_buf).write_text("row,reason\n1,")  # half a file, then the disk fills up
            raise OSError("No space left on device")
        return real_to_csv(self, path_or_buf, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        predict_stage(uri, tmp_path / "in.csv", out, params)
    monkeypatch.undo()
    assert rejects.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "scores.csv", "scores.rejected.csv"]
