"""Many workers on one PostgreSQL study: every trial exactly once, exactly the budget, nothing left
behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from search.db import pipeline
from search.db.storage import open_storage
from tests.helpers import hpo, start_stub_worker, write_space

SPACE = """
    dataset = "digits"
    [[stage]]
    name = "load"
    trials = {trials}
    epochs = 1
    sampler = {{ startup_trials = 20 }}
    [stage.params]
    lr = {{ low = 0.001, high = 1.0, log = true }}
    momentum = {{ low = 0.5, high = 0.99 }}
"""


def _deadlocks(url: str) -> int:
    """Deadlocks PostgreSQL detected in this test's database, by its own statistics (a fresh
    database starts at 0; a backend reports its counts when it exits, and the workers have)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
            return int(conn.execute(sa.text(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            )).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("workers", "trials"),
    [(4, 40), pytest.param(8, 200, marks=pytest.mark.slow, id="8-workers-200-trials")],
)
def test_many_workers_one_study(pg_url: str, tmp_path: Path, workers: int, trials: int) -> None:
    space = write_space(tmp_path / "load.toml", SPACE.format(trials=trials))
    assert hpo("create", "--space", str(space), "--study", "load", url=pg_url,
               cwd=tmp_path).returncode == 0
    started = time.monotonic()
    procs = [start_stub_worker("load", url=pg_url, cwd=tmp_path, log=tmp_path / f"w{i}.log")
             for i in range(workers)]
    codes = [p.wait(timeout=900) for p in procs]
    seconds = time.monotonic() - started

    storage = open_storage(pg_url)
    study = pipeline.load_stage_study(storage, "load", pipeline.load(storage, "load").stages[0])
    ran = study.get_trials()
    numbers = sorted(t.number for t in ran)
    by_state = {s.name: sum(t.state == s for t in ran) for s in TrialState}
    finished = by_state["COMPLETE"] + by_state["PRUNED"]
    deadlocks = _deadlocks(pg_url)
    print(f"\n{workers} workers, {len(ran)} trials in {seconds:.1f}s: {by_state};"
          f" duplicates {len(numbers) - len(set(numbers))}; deadlocks {deadlocks}")

    assert codes == [0] * workers, [
        (tmp_path / f"w{i}.log").read_text()[-2000:] for i, c in enumerate(codes) if c
    ]
    assert numbers == list(range(len(ran)))  # each number exactly once, none missing
    assert by_state["RUNNING"] == by_state["WAITING"] == by_state["FAIL"] == 0
    assert finished == trials  # budget slots: exactly the budget, with any number of workers
    assert deadlocks == 0
