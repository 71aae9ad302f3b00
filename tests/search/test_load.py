"""Many workers on one PostgreSQL study: every trial exactly once, nothing left behind."""

from __future__ import annotations

import time
from pathlib import Path

from optuna.trial import TrialState

from search import pipeline
from search.storage import open_storage
from tests.search.conftest import hpo, start_stub_worker, write_space

WORKERS = 8
TRIALS = 200
SPACE = f"""
    dataset = "digits"
    [[stage]]
    name = "load"
    trials = {TRIALS}
    epochs = 1
    sampler = {{ startup_trials = 20 }}
    [stage.params]
    lr = {{ low = 0.001, high = 1.0, log = true }}
    momentum = {{ low = 0.5, high = 0.99 }}
"""
PG_LOG = Path("/var/log/postgresql/postgresql-15-main.log")


def test_eight_workers_two_hundred_trials(pg_url: str, tmp_path: Path) -> None:
    space = write_space(tmp_path / "load.toml", SPACE)
    assert hpo("create", "--space", str(space), "--study", "load", url=pg_url,
               cwd=tmp_path).returncode == 0
    log_start = PG_LOG.stat().st_size if PG_LOG.exists() else None
    started = time.monotonic()
    workers = [start_stub_worker("load", url=pg_url, cwd=tmp_path, log=tmp_path / f"w{i}.log")
               for i in range(WORKERS)]
    codes = [w.wait(timeout=900) for w in workers]
    seconds = time.monotonic() - started

    storage = open_storage(pg_url)
    study = pipeline.load_stage_study(storage, "load", pipeline.load(storage, "load").stages[0])
    trials = study.get_trials()
    numbers = sorted(t.number for t in trials)
    by_state = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    finished = by_state["COMPLETE"] + by_state["PRUNED"]
    deadlocks = 0
    if log_start is not None:
        with PG_LOG.open("rb") as f:
            f.seek(log_start)
            deadlocks = f.read().count(b"deadlock detected")
    print(f"\n{WORKERS} workers, {len(trials)} trials in {seconds:.1f}s: {by_state};"
          f" duplicates {len(numbers) - len(set(numbers))}; deadlocks {deadlocks}")

    assert codes == [0] * WORKERS, [
        (tmp_path / f"w{i}.log").read_text()[-2000:] for i, c in enumerate(codes) if c
    ]
    assert numbers == list(range(len(trials)))  # each number exactly once, none missing
    assert by_state["RUNNING"] == by_state["WAITING"] == by_state["FAIL"] == 0
    assert TRIALS <= finished <= TRIALS + WORKERS - 1
    assert deadlocks == 0
