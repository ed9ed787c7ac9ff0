"""``emm predict`` finds a registered version of the project's own store without MLflow
(``emm.tracking.loading.registered_folder``): the same folder MLflow resolves, for an alias and a version, and
nothing (MLflow's lookup, with its own message) where MLflow would not find one: an unknown alias, version or
name, a deleted version, ``@latest``, another workspace or another kind of store.

On the tiny registry built by the real CLI (``tiny_registry``: versions 1 and 2 of emm-census-income); an MLflow
upgrade that changes what its registry reads shows here first.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pytest
from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

from emm.errors import EMMError
from emm.pipeline.predict import predict_file
from emm.tracking.loading import load_scorer, registered_folder, scorer_from_folder
from emm.tracking.store import configure
from tests.integration.test_mlflow_ui_promote import MODEL, tiny_registry  # noqa: F401 (fixture)


def mlflow_folder(uri: str) -> Path:
    """The folder MLflow's own registry lookup gives for ``uri`` (a local file:// location here)."""
    return Path(unquote(urlparse(ModelsArtifactRepository.get_underlying_uri(uri)).path))


@pytest.fixture(scope="module")
def registry(tiny_registry, monkeypatch_module):  # noqa: F811 - the imported fixture
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch_module.delenv("MLFLOW_WORKSPACE", raising=False)
    configure(tiny_registry.store)
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "lookup", 1)
    return tiny_registry


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("uri", [f"models:/{MODEL}@challenger", f"models:/{MODEL}@lookup", f"models:/{MODEL}/1",
                                 f"models:/{MODEL}/2"])
def test_a_registered_version_is_the_folder_mlflow_resolves(registry, uri):
    found = registered_folder(uri, registry.uri)
    assert found is not None and (found / "MLmodel").is_file()
    assert found.resolve() == mlflow_folder(uri).resolve()


@pytest.mark.parametrize("uri", [f"models:/{MODEL}@nosuchalias", f"models:/{MODEL}/99", "models:/emm-nosuchmodel/1",
                                 f"models:/{MODEL}@latest", f"models:/{MODEL}/Production", "runs:/abc/model"])
def test_what_mlflow_must_resolve_is_left_to_mlflow(registry, uri):
    assert registered_folder(uri, registry.uri) is None


def test_another_store_or_workspace_is_left_to_mlflow(registry, monkeypatch):
    uri = f"models:/{MODEL}/1"
    assert registered_folder(uri, "http://127.0.0.1:5000") is None
    assert registered_folder(uri, f"{registry.uri}?mode=ro") is None
    assert registered_folder(uri, "sqlite:////no/such/mlflow.db") is None
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-b")
    assert registered_folder(uri, registry.uri) is None


def test_found_folder_scores_as_mlflows_download(registry, census_small_raw, tmp_path):
    """The scorer read in place scores exactly as the one built from MLflow's downloaded copy."""
    uri = f"models:/{MODEL}@challenger"
    rows = census_small_raw / "census-income.test.gz"
    direct = predict_file(load_scorer(uri, registry.store), rows, tmp_path / "direct.csv", progress=False)
    copy = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "copy")))
    downloaded = predict_file(scorer_from_folder(copy, uri), rows, tmp_path / "downloaded.csv", progress=False)
    assert direct.scored == downloaded.scored > 0
    assert np.array_equal(np.loadtxt(direct.output, delimiter=",", skiprows=1),
                          np.loadtxt(downloaded.output, delimiter=",", skiprows=1))


def test_a_deleted_version_is_not_found_either_way(registry):
    """Runs last in this module: it deletes version 1 (the module's registry copy is its own)."""
    mlflow.MlflowClient().delete_model_version(MODEL, 1)
    assert registered_folder(f"models:/{MODEL}/1", registry.uri) is None
    with pytest.raises(EMMError, match="cannot load model"):
        load_scorer(f"models:/{MODEL}/1", registry.store)
