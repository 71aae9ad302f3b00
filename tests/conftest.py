"""Shared fixtures: one torch thread per test process, a fresh PostgreSQL database per test, the
same test on SQLite and PostgreSQL, and one finished study shared by the read-only tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.helpers import ADMIN_URL, admin, hpo, tiny_space


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    # The test machine is shared and small: one intra-op thread per test process keeps runs from
    # oversubscribing it, and fixes the float summation order that bitwise checks rely on.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for this test, dropped afterwards."""
    name = f"hpo_test_{uuid.uuid4().hex[:12]}"
    conn = admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg2", database=name)
    yield url.render_as_string(hide_password=False)
    conn = admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


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
