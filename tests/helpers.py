"""Helpers for tests that use real databases and real `hpo` processes: admin connections to
PostgreSQL, running the CLI and workers, and small space files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg2
import sqlalchemy as sa
from sqlalchemy.engine import make_url

ADMIN_URL = os.environ.get("HPO_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
ROOT = Path(__file__).resolve().parents[1]

# Short heartbeats so tests see a dead worker's trial failed within seconds, not minutes.
FAST_BEATS = {"HPO_HEARTBEAT": "1", "HPO_GRACE": "8"}


def admin(database: str | None = None) -> psycopg2.extensions.connection:
    """An autocommit connection to the server's admin database, or to `database`."""
    url = make_url(ADMIN_URL)
    conn = psycopg2.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password,
        dbname=database or url.database, connect_timeout=5,
    )
    conn.autocommit = True
    return conn


def create_database(prefix: str) -> str:
    """A new, empty database on the test server, `<prefix>_<random>`; returns its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin_execute(statement: str) -> None:
    conn = admin()
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


def database_url(name: str) -> str:
    """The SQLAlchemy URL of database `name` on the test server, password included."""
    return make_url(ADMIN_URL).set(drivername="postgresql+psycopg2", database=name) \
        .render_as_string(hide_password=False)


def hpo_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    return {**env, "HPO_STORAGE": url, "PYTHONUNBUFFERED": "1", **FAST_BEATS, **extra}


def hpo(
    *args: str, url: str, cwd: Path, timeout: float = 600, **extra: str
) -> subprocess.CompletedProcess[str]:
    """Run `hpo ARGS` to completion as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], cwd=cwd, env=hpo_env(url, **extra),
        capture_output=True, text=True, timeout=timeout,
    )


def start_worker(study: str, *, url: str, cwd: Path, log: Path, **extra: str) -> subprocess.Popen:
    """A worker process in the background, its output in `log`."""
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", "worker", "--study", study, "--device", "cpu",
         "--threads", "1", "--artifacts", str(cwd / "artifacts")],
        cwd=cwd, env=hpo_env(url, **extra), stdout=out, stderr=subprocess.STDOUT,
    )


def stop_process(proc: subprocess.Popen, grace: float = 30) -> int:
    """SIGTERM, as a service manager stops it; SIGKILL after `grace` seconds. Its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Poll until `predicate()` holds. The timeout only bounds how long a failure takes to be
    reported; nothing is asserted about how long the wait was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def write_space(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


# Two short stages on digits with a tiny ResNet: a trial takes a second or two on one core.
TINY_SPACE = """
    dataset = "digits"
    [fixed]
    model = "resnet20"
    width = 0.25
    crop_pad = 1
    batch_size = 64
    [[stage]]
    name = "optimizer"
    trials = {trials1}
    epochs = {epochs}
    pruner = {{ startup_trials = 2, warmup_epochs = 1 }}
    sampler = {{ startup_trials = 2 }}
    [stage.params]
    lr = {{ low = 0.02, high = 0.4, log = true }}
    momentum = {{ low = 0.8, high = 0.95 }}
    [[stage]]
    name = "regularization"
    trials = {trials2}
    epochs = {epochs}
    pruner = {{ startup_trials = 2, warmup_epochs = 1 }}
    sampler = {{ startup_trials = 2 }}
    [stage.params]
    label_smoothing = {{ low = 0.0, high = 0.2 }}
    weight_decay = {{ low = 1e-5, high = 1e-3, log = true }}
"""


def tiny_space(path: Path, *, trials1: int = 4, trials2: int = 3, epochs: int = 2) -> Path:
    return write_space(path, TINY_SPACE.format(trials1=trials1, trials2=trials2, epochs=epochs))


def table_names(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


def start_stub_worker(
    study: str, *, url: str, cwd: Path, log: Path, **extra: str
) -> subprocess.Popen:
    """A real worker process whose trainer is the fast stub in tests/search/stub_worker.py."""
    out = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.search.stub_worker", "worker", "--study", study,
         "--device", "cpu", "--threads", "1", "--artifacts", str(cwd / "artifacts")],
        cwd=ROOT, env=hpo_env(url, **extra), stdout=out, stderr=subprocess.STDOUT,
    )


def run_stub_study(space: Path, study: str, *, url: str, cwd: Path) -> None:
    """`hpo create` the study from `space`, then one stub worker (`start_stub_worker`) until it
    has run every stage; fails with the worker's log if either does not succeed."""
    created = hpo("create", "--space", str(space), "--study", study, url=url, cwd=cwd)
    assert created.returncode == 0, created.stderr
    log = cwd / f"{study}-worker.log"
    worker = start_stub_worker(study, url=url, cwd=cwd, log=log)
    assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
