"""Exit codes and messages of ``emm promote`` and ``emm predict``: 0 done, 3 not promoted (a decision, not a
failure), 2 a user error with a one-line message (never a traceback), over a real registry."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from emm.cli import app
from emm.tracking import registry
from tests.integration.test_predict_raw import MODEL, log_untrained_model

SCORES = {"1": "0.950000", "2": "0.900000"}  # version 2 (the challenger) is the worse one


@pytest.fixture(scope="module")
def store(census_small_data, tmp_path_factory):
    """emm-census-income versions 1 and 2 with score tags, challenger on 2, no champion yet."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for seed, (version, score) in enumerate(SCORES.items()):
            uri, _ = log_untrained_model(census_small_data, root / "mlruns", root / f"work{seed}", seed=seed)
            assert uri.endswith(f"/{version}")
            registry.tag_version(MODEL, version, {registry.SCORE_TAG: score})
        params = root / "params.yaml"
        params.write_text(f"tracking:\n  store: {root / 'mlruns'}\n")
        yield params


def emm(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    said = " ".join(result.output.split())  # rich wraps long lines at the runner's terminal width
    assert "Traceback" not in said, said
    assert result.exception is None or isinstance(result.exception, SystemExit), said  # no crash
    return result.exit_code, said


def test_promote_exit_codes(store):
    assert emm("promote", "census-income", "--version", "1", "--params", str(store)) == \
        (0, "promoted version 1 (mean test AUC 0.95000) to champion over no champion")
    code, said = emm("promote", "census-income", "--params", str(store))  # the challenger, version 2
    assert code == 3 and "not promoted: version 2 mean test AUC 0.90000 does not beat champion version 1" in said
    code, said = emm("promote", "census-income", "--version", "1", "--params", str(store))
    assert (code, said) == (3, "version 1 is already the champion")


@pytest.mark.parametrize("version, message", [
    ("99", "error: 'emm-census-income' has no version 99; its versions are [1, 2]"),
    ("abc", "error: --version 'abc' is not a version number of 'emm-census-income' (use e.g. --version 3)"),
    ("-1", "error: --version '-1' is not a version number of 'emm-census-income'"),
])
def test_promote_unknown_or_malformed_version_is_a_user_error(store, version, message):
    code, said = emm("promote", "census-income", "--version", version, "--params", str(store))
    assert code == 2 and said.startswith(message), said


def test_promote_of_an_unregistered_dataset_is_a_user_error(store):
    code, said = emm("promote", "ali-ccp", "--params", str(store))
    assert code == 2 and "no registered model 'emm-ali-ccp'" in said and "run `emm evaluate ali-ccp` first" in said


def test_promote_help_documents_the_exit_codes():
    code, said = emm("promote", "--help")
    assert code == 0 and "3 not promoted" in said and "2 a user error" in said


@pytest.mark.parametrize("uri, message", [
    ("http://127.0.0.1:5000/#/models/emm-census-income", "is a web address, not a model URI: use models:/"),
    ("https://mlflow.example.org/models/emm-census-income/1", "is a web address, not a model URI"),
    ("ftp://host/model", "unsupported scheme 'ftp'"),
    ("no/such/folder", "no such model folder"),
    ("models:/emm-census-income@nobody", "cannot load model 'models:/emm-census-income@nobody'"),
    ("models:/emm-census-income/7", "cannot load model 'models:/emm-census-income/7'"),
])
def test_predict_with_a_bad_model_uri_is_a_user_error(store, tmp_path, uri, message):
    (tmp_path / "in.csv").write_text("age\n1\n")
    code, said = emm("predict", "--model-uri", uri, "--input", str(tmp_path / "in.csv"), "--output",
                     str(tmp_path / "out.csv"), "--params", str(store))
    assert code == 2 and message in said, said
    assert not (tmp_path / "out.csv").exists()
