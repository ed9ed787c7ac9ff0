"""A logged EMM model is data, not code to unpickle: the MLflow model folder holds no pickle, loads with
pickle deserialization switched off, and ``emm predict`` runs nothing from a model folder, however crafted
(a ``python_model.pkl`` that runs a shell command, a code file that does, a ``model.json`` naming some
other function as its builder)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from emm.data.schema import Schema
from emm.data.tensors import load_split
from emm.errors import EMMError
from emm.pipeline.predict import predict_stage
from emm.tracking.pyfunc import raw_example
from emm.tracking.store import configure
from tests.conftest import REPO
from tests.integration.test_predict_raw import logged_in_store

# Every file of a registered model as downloaded, and nothing else: the bundle, MLflow's metadata
# (registered_model_meta is the registry's name/version note), and the code file.
MODEL_FILES = {
    "MLmodel", "registered_model_meta", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
    "serving_input_example.json", "scorer_model.py", "artifacts/bundle/model.json",
    "artifacts/bundle/weights.safetensors", "artifacts/bundle/schema.json", "artifacts/bundle/vocabulary.parquet",
}


class ShellPayload:
    """Unpickling this runs ``touch <marker>``: what a crafted python_model.pkl can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def logged(census_small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("model-files")
    with logged_in_store(census_small_data, root) as (params, uri, model):
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(root / "downloaded")))
        yield params, uri, model, folder


def expected_scores(data_dir: Path, model: torch.nn.Module, rows: int) -> np.ndarray:
    schema = Schema.load(data_dir)
    test = load_split(data_dir, "test", schema).head(rows)
    with torch.no_grad():
        return torch.sigmoid(model(test.sparse, test.dense)).numpy()[:, 0]


def test_logged_model_holds_no_pickle_and_loads_with_pickles_refused(logged, census_small_data, monkeypatch):
    params, uri, model, folder = logged
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert files == MODEL_FILES, f"unexpected files (a pickle?): {sorted(files ^ MODEL_FILES)}"
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in flavor  # the key that names a pickled PythonModel
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "scorer_model.py"
    assert (folder / "scorer_model.py").read_text() == (REPO / "emm" / "tracking" / "scorer_model.py").read_text()
    # MLflow's switch for pickled models, off: a model with nothing pickled still loads and scores
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    configure(params.parent / "mlruns")
    scores = mlflow.pyfunc.load_model(uri).predict(raw_example(census_small_data, rows=20))
    np.testing.assert_allclose(scores["score_income"].to_numpy(), expected_scores(census_small_data, model, 20),
                               rtol=1e-5, atol=1e-6)


def craft(folder: Path, dest: Path, how: str, marker: Path) -> Path:
    """A copy of the logged model made to run ``touch marker`` when MLflow loads it."""
    shutil.copytree(folder, dest)
    mlmodel = yaml.safe_load((dest / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    flavor.pop("model_code_path", None)
    flavor.pop("python_model", None)
    if how == "pickle":  # the layout EMM logged before models-from-code, with a hostile pickle
        (dest / "python_model.pkl").write_bytes(pickle.dumps(ShellPayload(marker)))
        flavor.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    else:  # the models-from-code layout, with a hostile code file (that then sets the real model)
        (dest / "scorer_model.py").write_text(
            f"import os\nos.system('touch {marker}')\nfrom mlflow.models import set_model\n"
            "from emm.tracking.pyfunc import EMMScorer\nset_model(EMMScorer())\n")
        flavor.update(loader_module="mlflow.pyfunc.loaders.code_model", model_code_path="scorer_model.py")
    (dest / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return dest


@pytest.mark.parametrize("how", ["pickle", "code"])
def test_emm_predict_runs_no_code_from_the_model_folder(logged, census_small_data, tmp_path, how):
    params, _, _, folder = logged
    marker = tmp_path / "pwned"
    crafted = craft(folder, tmp_path / "crafted", how, marker)
    rows = raw_example(census_small_data, rows=20)
    rows.to_csv(tmp_path / "in.csv", index=False)
    try:
        report = predict_stage(str(crafted), tmp_path / "in.csv", tmp_path / "out.csv", params)
    finally:  # checked even when loading fails: what matters first is whether the payload ran
        assert not marker.exists(), "emm predict ran code from the model folder"
    assert report.scored == 20  # scored from the bundle, which is intact
    # the crafted model is live: MLflow's own loader does run it (the reason emm predict does not use it)
    with contextlib.suppress(Exception):  # the payload may break the model; only whether it ran matters
        mlflow.pyfunc.load_model(str(crafted))
    assert marker.exists()


def test_model_json_naming_another_builder_is_refused(logged, census_small_data, tmp_path):
    params, _, _, folder = logged
    crafted = tmp_path / "crafted"
    shutil.copytree(folder, crafted)
    meta_path = crafted / "artifacts" / "bundle" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["builder"] = "os:system"
    meta_path.write_text(json.dumps(meta))
    raw_example(census_small_data, rows=3).to_csv(tmp_path / "in.csv", index=False)
    with pytest.raises(EMMError, match=r"model\.json names builder 'os:system', which is not one of EMM's model "
                                       r"builders .*refusing to import it"):
        predict_stage(str(crafted), tmp_path / "in.csv", tmp_path / "out.csv", params)
    with pytest.raises(Exception, match=r"names builder 'os:system'"):  # MLflow's loader: the same refusal
        mlflow.pyfunc.load_model(str(crafted))
    assert not (tmp_path / "out.csv").exists()


def test_a_folder_that_is_not_an_emm_model_is_refused(logged, tmp_path):
    params, _, _, folder = logged
    (tmp_path / "in.csv").write_text("age\n1\n")
    with pytest.raises(EMMError, match=r"is not an MLflow model \(no MLmodel file in it\)"):
        predict_stage(str(tmp_path), tmp_path / "in.csv", tmp_path / "out.csv", params)
    crafted = tmp_path / "no-bundle"
    shutil.copytree(folder, crafted)
    shutil.rmtree(crafted / "artifacts")
    with pytest.raises(EMMError, match=r"is not a model logged by EMM"):
        predict_stage(str(crafted), tmp_path / "in.csv", tmp_path / "out.csv", params)
