"""Optuna's own storage test suite (`optuna.testing.pytest_storages.StorageTestCase`), run
against the storage this service opens: its engine settings (small pool, idle ping, timeouts),
heartbeats and re-queue callback, on a fresh PostgreSQL database per test."""

from __future__ import annotations

from collections.abc import Iterator

import optuna
import pytest
from optuna.testing.pytest_storages import StorageTestCase

from search.db.storage import open_storage


@pytest.fixture
def storage(pg_url: str) -> Iterator[optuna.storages.RDBStorage]:
    opened = open_storage(pg_url, create_schema=True)
    yield opened
    opened.engine.dispose()  # so the database can be dropped


class TestServiceStorage(StorageTestCase):
    """Every inherited test runs as is: the service's settings must not break any of them."""
