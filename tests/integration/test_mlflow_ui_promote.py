"""A promotion done by hand in the MLflow UI is what ``emm predict ...@champion`` then scores.

End to end, with real processes only: the ``emm`` CLI builds a tiny registry on a real Census slice
(ingest -> pretrain -> decompose -> fuse -> evaluate, twice with two fusion seeds, so ``emm-census-income``
has versions 1 and 2, ``@challenger`` on 2); ``mlflow server`` serves that store on 127.0.0.1; a headless
Debian Chromium driven by Playwright opens version 1's page and adds the alias ``champion`` through the
"Add aliases" modal. Version 1 is neither the latest nor the challenger, so nothing but the UI action can
have put ``champion`` there. Then the registry (MlflowClient) and ``emm predict`` must agree: ``@champion``
scores exactly like ``models:/emm-census-income/1`` and unlike version 2.

Needs Debian's ``chromium`` (/usr/bin/chromium, or EMM_CHROMIUM=PATH) and the ``playwright`` package: both
are installed by the test command (scripts/browser.sh the browser, scripts/setup.sh the dev extra; Playwright
cannot download its own browser offline, so it drives the system one). A missing browser fails the test with that message: it is part of CI, never skipped.
Screenshots go to the test's tmp dir: ``ui-failure.png`` when the UI step fails, ``ui-alias-set.png`` at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from emm.tracking.processes import free_port, mlflow_executable, running_server
from tests.conftest import REPO, write_head

DATASET = "census-income"
MODEL = f"emm-{DATASET}"
TARGET = "1"  # the version the UI makes champion: not the latest, not the challenger
CHROMIUM = Path(os.environ.get("EMM_CHROMIUM", "/usr/bin/chromium"))
# Flags for a root user on a machine with no network: without the background-networking ones Chromium
# keeps trying (and failing) to reach Google's hosts.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1",
         "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


@dataclass
class Registry:
    project: Path          # the working directory of every CLI call (params paths are relative to it)
    env: dict[str, str]
    params: Path           # params/tiny.yaml: its store is <project>/artifacts/tiny/mlruns
    store: Path
    uri: str
    data_dir: Path


def emm(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 180) -> str:
    """The real CLI (the venv's console script), as a user runs it; its output on failure."""
    exe = Path(sys.executable).parent / "emm"
    out = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert out.returncode == 0, f"emm {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


def build_tiny_registry(project: Path, census_small_raw: Path) -> Registry:
    """``emm-census-income`` versions 1 (fusion seed 2026) and 2 (seed 2027, @challenger), built by the CLI in
    ``project``."""
    from emm.tracking.store import tracking_uri
    from tests.integration.cli_here import run_cli

    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(QUIET, PATH=f"{venv_bin}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PREFECT_HOME=str(project / ".prefect"))
    params = REPO / "params" / "tiny.yaml"
    second = yaml.safe_load(params.read_text())
    second["fuse"]["train"]["seed"] += 1  # another fused model over the same pool: other scores
    params2 = project / "tiny-seed2.yaml"
    params2.write_text(yaml.safe_dump(second))
    p1, p2 = ["--params", str(params)], ["--params", str(params2)]
    # the CLI's own app in this process (tests.integration.cli_here: the stages' imports are paid once, not per
    # call); `env` stays what a served or UI process of this registry gets
    run_cli(["ingest", DATASET, "--raw-dir", str(census_small_raw), *p1], project)
    run_cli(["pretrain", DATASET, *p1], project)
    run_cli(["decompose", DATASET, *p1], project)
    run_cli(["fuse", DATASET, *p1], project)
    assert "version 1 (alias challenger)" in run_cli(["evaluate", DATASET, *p1], project)
    run_cli(["fuse", DATASET, *p2], project)
    assert "version 2 (alias challenger)" in run_cli(["evaluate", DATASET, *p2], project)
    store = project / "artifacts" / "tiny" / "mlruns"
    with pytest.MonkeyPatch.context() as mp:  # the CLI ran without MLFLOW_TRACKING_URI: so does this rule
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = tracking_uri(store)  # the project's own: sqlite:///<store>/mlflow.db
    assert (store / "mlflow.db").is_file(), sorted(p.name for p in store.iterdir())
    return Registry(project, env, params, store, uri, project / "artifacts" / "tiny" / DATASET / "data")


@pytest.fixture(scope="module")
def tiny_registry(tiny_registry_snapshot) -> Registry:
    """The registry of ``build_tiny_registry``, as it was built, for this module alone.

    Why restored and not rebuilt: several modules need this registry and each changes it (aliases, versions,
    exports); building it is the slow part, copying it back is not. It is restored at the path it was built
    at, because the MLflow store records its artifacts' absolute paths (tests/integration/conftest.py)."""
    registry, snapshot = tiny_registry_snapshot
    shutil.rmtree(registry.project)
    shutil.copytree(snapshot, registry.project, symlinks=True)
    return registry


@pytest.fixture(scope="module")
def mlflow_ui(tiny_registry, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 over the registry's store; stopped by its process group at teardown."""
    logs = tmp_path_factory.mktemp("mlflow-ui")
    port = free_port()
    env = dict(tiny_registry.env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no huey job workers on 2 cores
    args = [mlflow_executable(), "server", "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1", "--backend-store-uri", tiny_registry.uri, "--registry-store-uri", tiny_registry.uri,
            "--default-artifact-root", (tiny_registry.store / "artifacts").as_uri(), "--no-serve-artifacts"]
    with running_server(args, port, "/health", logs / "server.log", env=env, cwd=logs, timeout_s=90) as base:
        yield base


def add_alias_in_ui(base: str, version: str, alias: str, shots: Path) -> None:
    """Open the version's page in headless Chromium and add ``alias`` through the "Add aliases" modal."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run `bash scripts/setup.sh` (it is in the dev extra)")
    if not CHROMIUM.is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: `bash scripts/browser.sh` (part of the test command) installs Debian's `chromium` with apt-get "
                    f"(as root); elsewhere install a Chromium and set EMM_CHROMIUM=/path/to/it")
    events: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(shots / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900})
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(30_000)  # clicks and loads; a busy 2-core machine renders the SPA slowly
        expect.set_options(timeout=30_000)  # the assertions' own default is 5 s
        page.on("console", lambda m: events.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("requestfailed", lambda r: events.append(f"request failed: {r.method} {r.url} {r.failure}"))
        try:
            page.goto(f"{base}/#/models/{MODEL}/versions/{version}")
            expect(page.get_by_role("heading", name=f"Version {version}")).to_be_visible()
            # the "Aliases:" item of the page header: an "Add" link button (title "Add aliases") while it has none
            aliases = page.get_by_test_id("descriptions-item").filter(has_text="Aliases")
            aliases.locator('button[title="Add aliases"]').click()
            dialog = page.get_by_role("dialog")
            expect(dialog).to_contain_text(f"Add/Edit alias for model version {version}")
            box = dialog.get_by_role("combobox")  # an antd "tags" select: type, Enter makes the chip
            box.fill(alias)
            box.press("Enter")
            expect(dialog.locator(f'[role="status"][title="{alias}"]')).to_be_visible()
            save = dialog.get_by_role("button", name="Save aliases")
            expect(save).to_be_enabled()
            save.click()
            expect(dialog).to_be_hidden()
            expect(aliases).to_contain_text(alias)  # the page shows "@ champion" once the server said yes
            page.screenshot(path=str(shots / "ui-alias-set.png"), full_page=True)
        except Exception as exc:
            shot = shots / "ui-failure.png"
            page.screenshot(path=str(shot), full_page=True)
            (shots / "ui-failure.html").write_text(page.content())
            log = "\n".join(events[-30:])
            raise AssertionError(f"MLflow UI step failed ({exc}); screenshot {shot}; browser events:\n{log}") from exc
        finally:
            context.close()


def scores(registry: Registry, uri: str, rows: Path, out: Path) -> pd.DataFrame:
    said = emm(["predict", "--model-uri", uri, "--input", str(rows), "--output", str(out),
                "--params", str(registry.params)], registry.env, registry.project)
    frame = pd.read_csv(out)
    assert f"scored {len(frame)} rows" in said and list(frame.columns) == ["row", "score_income", "score_marital"]
    return frame


@pytest.mark.slow
def test_champion_set_in_mlflow_ui_is_what_predict_scores(tiny_registry, mlflow_ui, tmp_path, census_small_raw):

    client = mlflow.MlflowClient(tracking_uri=tiny_registry.uri, registry_uri=tiny_registry.uri)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))
    assert versions == ["1", "2"]
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    with pytest.raises(mlflow.exceptions.MlflowException):  # no champion yet: only the UI will set one
        client.get_model_version_by_alias(MODEL, "champion")

    add_alias_in_ui(mlflow_ui, TARGET, "champion", tmp_path)

    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == TARGET
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"  # untouched
    aliases = {alias: str(v) for alias, v in client.get_registered_model(MODEL).aliases.items()}
    assert aliases == {"champion": TARGET, "challenger": "2"}

    # Raw rows straight from the UCI test file (headerless, integer dense values), as a user would pass them.
    src = tmp_path / "rows.csv"
    write_head(census_small_raw / "census-income.test.gz", src, 200)
    rows = pd.read_csv(src, header=None)
    champion = scores(tiny_registry, f"models:/{MODEL}@champion", src, tmp_path / "champion.csv")
    v1 = scores(tiny_registry, f"models:/{MODEL}/1", src, tmp_path / "v1.csv")
    v2 = scores(tiny_registry, f"models:/{MODEL}/2", src, tmp_path / "v2.csv")
    assert len(champion) == len(rows)
    pd.testing.assert_frame_equal(champion, v1)  # identical: @champion is version 1
    diff = (champion[["score_income", "score_marital"]] - v2[["score_income", "score_marital"]]).abs()
    assert diff.to_numpy().max() > 1e-4, "versions 1 and 2 score alike: the check could not tell them apart"
