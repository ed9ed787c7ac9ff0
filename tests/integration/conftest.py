"""Integration fixtures built once per test session and shared by several modules."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_mlflow_ui_promote import Registry, build_tiny_registry


@pytest.fixture(scope="session")
def tiny_registry_snapshot(tmp_path_factory, census_small_raw) -> Iterator[tuple[Registry, Path]]:
    """The tiny registry built once, and a copy of its project as built.

    Modules get it through ``tiny_registry`` (module scope), which puts this copy back at the project's own path
    first: each module starts from the same registry whatever the modules before it did to theirs. A session
    fixture lives here and not in a test module because a fixture imported into several modules is a separate
    fixture in each (it would be built once per module).

    The tests' own MLflow clients open the store's SQLite file anew for every session (``NullPool``): MLflow
    keeps one engine per database URI for the process, and a pooled connection would go on reading the file
    that the restore replaced."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        project = tmp_path_factory.mktemp("ui-project")
        registry = build_tiny_registry(project, census_small_raw)
        snapshot = tmp_path_factory.mktemp("ui-project-as-built") / "project"
        shutil.copytree(project, snapshot, symlinks=True)
        yield registry, snapshot
