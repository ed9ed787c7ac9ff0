"""REST serving: ``mlflow models serve`` of ``models:/emm-census-income@champion`` scores raw rows like ``emm predict``.

End to end with real processes: the ``emm`` CLI builds a tiny registry on a real Census slice
(``tiny_registry``, as the MLflow UI test builds it: versions 1 and 2, ``@challenger`` on 2), ``emm promote``
makes the challenger champion, and ``mlflow models serve -m models:/emm-census-income@champion
--env-manager local`` serves it on 127.0.0.1 (its own process group, stopped at the end, and the port
checked closed). Raw UCI test rows, as a user's pandas reads them (integer dense values, text
elsewhere, the label columns too), are posted as MLflow's ``dataframe_split`` JSON, in one request and
one row at a time; the answers must equal ``emm predict`` on the same rows, and a request missing a
required column must be refused with a 4xx that names it. A request with bad rows (``"forty"`` for age, a
missing value) is refused whole with a 400 whose message names every bad row and its column, and no
traceback or file path of the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from emm.data.spec import resolve_dataset
from emm.tracking.processes import free_port, model_server_args, running_server
from tests.conftest import REPO, write_head
from tests.integration.test_mlflow_ui_promote import DATASET, MODEL, emm, tiny_registry  # noqa: F401

ROWS = 120


@contextlib.contextmanager
def model_server(model_uri: str, env: dict[str, str], cwd: Path, log_path: Path) -> Iterator[str]:
    """``mlflow models serve`` on a free loopback port until /ping answers; its process group stopped on exit
    and the port checked closed (``emm.tracking.processes``)."""
    port = free_port()
    with running_server(model_server_args(model_uri, port), port, "/ping", log_path, env=env, cwd=cwd) as base:
        yield base


def post_split(base: str, frame: pd.DataFrame) -> httpx.Response:
    """``frame`` as MLflow's ``dataframe_split`` JSON (pandas' own split orientation)."""
    payload = {"dataframe_split": frame.to_dict(orient="split", index=False)}
    return httpx.post(f"{base}/invocations", json=payload, timeout=60)


@pytest.mark.slow
def test_served_champion_scores_raw_rows_like_emm_predict(tiny_registry, census_small_raw, tmp_path):
    reg = tiny_registry
    said = emm(["promote", DATASET, "--params", str(reg.params)], reg.env, reg.project)
    assert "promoted version 2" in said, said

    raw = tmp_path / "rows.csv"
    write_head(census_small_raw / "census-income.test.gz", raw, ROWS)
    rows = pd.read_csv(raw, header=None, names=resolve_dataset(DATASET).columns, skipinitialspace=True)
    assert rows["age"].dtype == np.int64 and pd.api.types.is_string_dtype(rows["education"])  # as pandas reads them
    named = tmp_path / "named.csv"
    rows.to_csv(named, index=False)
    emm(["predict", "--model-uri", f"models:/{MODEL}@champion", "--input", str(named), "--output",
         str(tmp_path / "predict.csv"), "--params", str(reg.params)], reg.env, reg.project)
    expected = pd.read_csv(tmp_path / "predict.csv")
    assert len(expected) == ROWS and list(expected.columns) == ["row", "score_income", "score_marital"]

    env = dict(reg.env, MLFLOW_TRACKING_URI=reg.uri, MLFLOW_REGISTRY_URI=reg.uri)
    with model_server(f"models:/{MODEL}@champion", env, reg.project, tmp_path / "serve.log") as base:
        answer = post_split(base, rows)
        assert answer.status_code == 200, answer.text
        served = pd.DataFrame(answer.json()["predictions"])
        singles = []
        for i in range(5):  # one row per request, as an online caller sends them
            one = post_split(base, rows.iloc[[i]])
            assert one.status_code == 200, one.text
            singles.append(pd.DataFrame(one.json()["predictions"]))
        missing = post_split(base, rows.drop(columns=["education"]))
        bad = rows.head(6).astype({"age": object})
        bad.loc[1, "age"] = "forty"
        bad.loc[4, "education"] = ""
        refused = post_split(base, bad)
    assert list(served.columns) == ["score_income", "score_marital"] and len(served) == ROWS
    cols = ["score_income", "score_marital"]
    np.testing.assert_allclose(served[cols].to_numpy(), expected[cols].to_numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pd.concat(singles)[cols].to_numpy(), expected[cols].head(5).to_numpy(),
                               rtol=1e-6, atol=1e-7)
    assert served[cols].std().min() > 1e-4  # the rows score differently: a real model answered
    assert 400 <= missing.status_code < 500 and "education" in missing.text, (missing.status_code, missing.text[:500])
    assert refused.status_code == 400, (refused.status_code, refused.text[:2000])
    body = refused.json()
    assert "stack_trace" not in body, body
    assert "2 of 6 rows cannot be scored, so none was: row 1: 'age' is not a number; row 4: missing value in " \
           "'education'" in body["message"], body["message"]
    for leak in (str(REPO), str(reg.project), "site-packages", ".py", "Traceback", "File \""):
        assert leak not in refused.text, (leak, refused.text[:2000])
