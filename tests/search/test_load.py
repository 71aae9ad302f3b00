"""Many workers on one PostgreSQL study: every trial exactly once, nothing left behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search import pipeline
from search.storage import open_storage
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
PG_LOG = Path("/var/log/postgresql/postgresql-15-main.log")


@pytest.mark.parametrize(
    ("workers", "trials"),
    [(4, 40), pytest.param(8, 200, marks=pytest.mark.slow, id="8-workers-200-trials")],
)
def test_many_workers_one_study(pg_url: str, tmp_path: Path, workers: int, trials: int) -> None:
    space = write_space(tmp_path / "load.toml", SPACE.format(trials=trials))
    assert hpo("create", "--space", str(space), "--study", "load", url=pg_url,
               cwd=tmp_path).returncode == 0
    log_start = PG_LOG.stat().st_size if PG_LOG.exists() else None
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
    deadlocks = 0
    if log_start is not None:
        with PG_LOG.open("rb") as f:
            f.seek(log_start)
            deadlocks = f.read().count(b"deadlock detected")
    print(f"\n{workers} workers, {len(ran)} trials in {seconds:.1f}s: {by_state};"
          f" duplicates {len(numbers) - len(set(numbers))}; deadlocks {deadlocks}")

    assert codes == [0] * workers, [
        (tmp_path / f"w{i}.log").read_text()[-2000:] for i, c in enumerate(codes) if c
    ]
    assert numbers == list(range(len(ran)))  # each number exactly once, none missing
    assert by_state["RUNNING"] == by_state["WAITING"] == by_state["FAIL"] == 0
    assert trials <= finished <= trials + workers - 1
    assert deadlocks == 0
