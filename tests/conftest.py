"""Shared fixtures: one torch thread per test process, a fresh PostgreSQL database per test, the
same test on SQLite and PostgreSQL, and one finished study shared by the read-only tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import create_database, database_url, drop_database, hpo, tiny_space


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # The test machine is shared and small: one intra-op thread per test process keeps runs from
    # oversubscribing it, and fixes the float summation order that bitwise checks rely on.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test, dropped afterwards."""
    name = create_database("hpo_test")
    yield database_url(name)
    drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against the embedded default and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hpo.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One small pipeline run to the end on SQLite, shared by the tests that only read results
    (report, dashboard). Returns (storage URL, its working folder); the study is named "done"."""
    cwd = tmp_path_factory.mktemp("finished")
    url = f"sqlite:///{cwd / 'hpo.db'}"
    space = tiny_space(cwd / "tiny.toml", trials1=3, trials2=2)
    run = hpo("run", "--space", str(space), "--study", "done", "--workers", "1", "--threads", "1",
              "--device", "cpu", "--artifacts", str(cwd / "artifacts"), url=url, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return url, cwd
