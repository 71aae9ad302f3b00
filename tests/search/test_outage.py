"""The database going away while workers run: a network blip shorter than the heartbeat grace
period, and real PostgreSQL restarts. Workers must survive, and no trial may be lost or run
twice."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.db import pipeline
from search.db.storage import open_storage
from tests.helpers import hpo, start_stub_worker, write_space
from tests.search.tcp_proxy import FlakyProxy

SPACE = """
    dataset = "digits"
    [[stage]]
    name = "only"
    trials = {trials}
    epochs = 4
    pruner = {{ startup_trials = 100 }}
    [stage.params]
    lr = {{ low = 0.001, high = 1.0, log = true }}
"""
# Beats every second, a trial declared dead after 10 s without one.
BEATS = {"HPO_HEARTBEAT": "1", "HPO_GRACE": "10", "STUB_EPOCH_SECONDS": "0.5"}
# For the blip: 3 s without the database against a grace of 60 s. A beat resumes within a
# second or two of the network (the beat thread retries every second), so a machine five times
# slower still beats long before the grace ends; nothing dies in that test, so the long grace
# costs no time.
BLIP_SECONDS = 3
BLIP_BEATS = {**BEATS, "HPO_GRACE": "60"}


def _trials(url: str) -> list:
    storage = open_storage(url)
    return pipeline.load_stage_study(
        storage, "o", pipeline.load(storage, "o").stages[0]).get_trials()


def _wait_finished(url: str, n: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(t.state == TrialState.COMPLETE for t in _trials(url)) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} trials completed in {timeout}s")


def _check_nothing_lost(url: str, trials: int, workers: int) -> list:
    ran = _trials(url)
    numbers = sorted(t.number for t in ran)
    assert numbers == list(range(len(ran))), "trial numbers must stay unique and dense"
    states = [t.state for t in ran]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    finished = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    assert finished == trials  # budget slots: exactly the budget, with any number of workers
    # A failed trial is an orphan of the outage: it kept its slot, and its retry took it.
    for t in ran:
        if t.state == TrialState.FAIL:
            assert any(r.user_attrs.get("retry_of") == t.number for r in ran), t.number
    return ran


def test_blip_shorter_than_grace_fails_no_trial(pg_url: str, tmp_path: Path) -> None:
    space = write_space(tmp_path / "o.toml", SPACE.format(trials=10))
    assert hpo("create", "--space", str(space), "--study", "o", url=pg_url,
               cwd=tmp_path).returncode == 0
    db = make_url(pg_url)
    proxy = FlakyProxy(db.port or 5432)
    via_proxy = db.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        procs = [start_stub_worker("o", url=via_proxy, cwd=tmp_path, log=tmp_path / f"w{i}.log",
                                   **BLIP_BEATS) for i in range(2)]
        blips = []
        for after in (2, 5):
            _wait_finished(pg_url, after)
            started = time.monotonic()
            proxy.cut()
            time.sleep(BLIP_SECONDS)
            proxy.restore()
            blips.append(time.monotonic() - started)
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        proxy.close()
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    ran = _check_nothing_lost(pg_url, 10, 2)
    failed = [t.number for t in ran if t.state == TrialState.FAIL]
    retries = sum("database unavailable" in log or "connection lost" in log for log in logs)
    print(f"\nblips {[round(b, 1) for b in blips]}s; trials {len(ran)}; failed {failed};"
          f" workers that retried a database call: {retries}")
    assert codes == [0, 0], [log[-2000:] for log in logs]
    assert failed == [], "a blip shorter than the grace period must fail no live trial"


def _restart_command() -> list[str] | None:
    if os.geteuid() != 0 or not shutil.which("pg_ctlcluster"):
        return None
    versions = sorted(os.listdir("/etc/postgresql"), key=float)
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "restart"]


def test_workers_survive_two_postgres_restarts(pg_url: str, tmp_path: Path) -> None:
    restart = _restart_command()
    if restart is None:
        if os.environ.get("CI"):
            pytest.fail("CI must be able to restart PostgreSQL (root and pg_ctlcluster)")
        pytest.skip("restarting PostgreSQL needs root and pg_ctlcluster (Debian's postgresql)")
    space = write_space(tmp_path / "o.toml", SPACE.format(trials=12))
    assert hpo("create", "--space", str(space), "--study", "o", url=pg_url,
               cwd=tmp_path).returncode == 0
    procs = [start_stub_worker("o", url=pg_url, cwd=tmp_path, log=tmp_path / f"w{i}.log",
                               **BEATS) for i in range(3)]
    downtime = []
    for after in (2, 6):
        _wait_finished(pg_url, after)
        started = time.monotonic()
        subprocess.run(restart, check=True, capture_output=True, timeout=120)
        downtime.append(time.monotonic() - started)
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(3)]
    ran = _check_nothing_lost(pg_url, 12, 3)
    print(f"\nrestarts took {[round(d, 1) for d in downtime]}s; trials {len(ran)};"
          f" failed and retried {[t.number for t in ran if t.state == TrialState.FAIL]}")
    assert codes == [0, 0, 0], [log[-2000:] for log in logs]


def test_orphan_is_reaped_by_a_busy_worker_and_its_retry_takes_its_slot(
    pg_url: str, tmp_path: Path
) -> None:
    # Long trials (40 epochs x 0.5 s): when one worker dies, the others are mid-trial, so only
    # the reaper thread running beside their training can notice.
    space = write_space(tmp_path / "o.toml", SPACE.format(trials=6).replace(
        "epochs = 4", "epochs = 40"))
    assert hpo("create", "--space", str(space), "--study", "o", url=pg_url,
               cwd=tmp_path).returncode == 0
    beats = {**BEATS, "HPO_GRACE": "6"}
    procs = [start_stub_worker("o", url=pg_url, cwd=tmp_path, log=tmp_path / f"w{i}.log",
                               **beats) for i in range(3)]
    deadline = time.monotonic() + 300
    while len([t for t in _trials(pg_url) if t.state == TrialState.RUNNING
               and len(t.intermediate_values) >= 2]) < 3:
        assert time.monotonic() < deadline, "three trials never ran at once"
        time.sleep(0.2)
    running = {t.user_attrs["worker"]: t for t in _trials(pg_url)
               if t.state == TrialState.RUNNING}
    victim = procs[0]
    orphan = next(t for w, t in running.items() if w.split("#")[0].endswith(f":{victim.pid}"))
    victim.kill()
    killed_at = time.monotonic()
    codes = [p.wait(timeout=600) for p in procs[1:]]
    logs = [(tmp_path / f"w{i}.log").read_text() for i in (1, 2)]
    ran = _check_nothing_lost(pg_url, 6, 3)
    assert codes == [0, 0], [log[-2000:] for log in logs]
    assert ran[orphan.number].state == TrialState.FAIL
    print(f"\norphan trial {orphan.number} reaped and retried; the pipeline ended"
          f" {time.monotonic() - killed_at:.1f}s after the SIGKILL")
    # A live worker's reaper failed it, between the start and the end of a trial of its own:
    # the beat thread reaps while the worker trains.
    reaped = f"trial {orphan.number} failed: no heartbeat for over the grace period; re-queued"
    (reaper,) = [log for log in logs if reaped in log]
    before, _, after = reaper.partition(reaped)
    assert re.findall(r"trial \d+: start", before) and re.findall(r"trial \d+: complete", after)
    retries = [t for t in ran if t.user_attrs.get("retry_of") == orphan.number]
    assert len(retries) == 1 and retries[0].params == orphan.params
    assert retries[0].state == TrialState.COMPLETE
