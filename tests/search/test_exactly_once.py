"""A commit that lands while its reply is lost: the worker cannot tell whether its transaction
happened, and its retry must not take a second trial or queue a configuration twice. The proxy
drops the connection after the server has run the COMMIT and before the reply comes back."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
from optuna.storages._rdb import models
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.db.storage import open_storage, with_retry
from search.db.writes import ask, queue_copy
from search.runtime.objective import suggest_once, upload_once
from search.runtime.retry import copy_attrs, reap
from search.space.params import FloatParam
from tests.search.tcp_proxy import FlakyProxy


@pytest.fixture
def studies(pg_url: str) -> Iterator[tuple[optuna.Study, optuna.Study, FlakyProxy]]:
    """The same study seen directly (to check on it) and through the proxy (the worker's view)."""
    direct = optuna.create_study(storage=open_storage(pg_url, create_schema=True),
                                 study_name="q")
    db = make_url(pg_url)
    proxy = FlakyProxy(db.port or 5432)
    via_proxy = db.set(port=proxy.port).render_as_string(hide_password=False)
    try:
        yield direct, optuna.load_study(study_name="q", storage=open_storage(via_proxy)), proxy
    finally:
        proxy.close()


def _failed_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, state=TrialState.FAIL)
    return study.get_trials()[-1]


def _beats(study: optuna.Study, trial_id: int) -> int:
    table = models.TrialHeartbeatModel.__table__
    with study._storage._backend.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)
                            .where(table.c.trial_id == trial_id)).scalar_one()


@pytest.mark.parametrize("queued", [False, True], ids=["new trial", "queued trial"])
def test_ask_whose_commit_reply_is_lost_takes_one_trial(
    studies: tuple[optuna.Study, optuna.Study, FlakyProxy], queued: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    direct, study, proxy = studies
    if queued:
        first = _failed_trial(direct)
        queue_copy(direct, first, copy_attrs(first, crashed=False))
    proxy.lose_commit_reply(b"UPDATE trials SET state" if queued else b"INSERT INTO trials ")
    with caplog.at_level(logging.WARNING, logger="search"):
        trial = ask(study)
    assert proxy.lost.is_set(), "the fault was not injected"
    assert "was taken before the connection dropped" in caplog.text, caplog.text
    assert _beats(direct, trial._trial_id) == 1, "a taken trial has its first beat"
    value = trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, value)

    trials = direct.get_trials()
    if queued:
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
        assert trials[1].params == trials[0].params and trials[1].user_attrs["retry_of"] == 0
    else:
        assert [t.state for t in trials] == [TrialState.COMPLETE]
    assert trials[-1].number == trial.number and trials[-1].value == value


def test_plain_ask_retried_under_the_same_fault_leaves_an_orphan(
    studies: tuple[optuna.Study, optuna.Study, FlakyProxy],
) -> None:
    """Why the worker takes trials itself: Optuna's ask, retried after the lost reply, takes a
    second trial and leaves the first RUNNING with nobody on it."""
    direct, study, proxy = studies
    proxy.lose_commit_reply(b"INSERT INTO trials ")
    trial = with_retry("ask", study.ask)
    assert proxy.lost.is_set(), "the fault was not injected"
    states = [t.state for t in direct.get_trials()]
    assert states == [TrialState.RUNNING, TrialState.RUNNING], states
    assert trial.number == 1


def test_queue_copy_whose_commit_reply_is_lost_queues_one_copy(
    studies: tuple[optuna.Study, optuna.Study, FlakyProxy],
) -> None:
    direct, study, proxy = studies
    failed = _failed_trial(direct)
    proxy.lose_commit_reply(b"INSERT INTO trials ")
    queue_copy(study, failed, copy_attrs(failed, crashed=True))
    assert proxy.lost.is_set(), "the fault was not injected"
    # A second reaper, or a caller retrying us: no effect.
    queue_copy(study, failed, copy_attrs(failed, crashed=True))
    trials = direct.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == failed.params
    assert trials[1].user_attrs == {"root": 0, "crashes": 1, "retry_of": 0}


def test_reaper_whose_commit_reply_is_lost_fails_and_requeues_once(
    studies: tuple[optuna.Study, optuna.Study, FlakyProxy],
) -> None:
    """Optuna's reaper commits the failure, then queues the retry: a connection lost between the
    two would leave the trial failed and never retried. Ours does both in one commit; its next
    round, after the lost reply, finds nothing left to do."""
    direct, study, proxy = studies
    orphan = direct.ask()
    orphan.suggest_float("x", 0.0, 1.0)
    proxy.lose_commit_reply(b"UPDATE trials SET state")
    with pytest.raises(sa.exc.OperationalError):
        reap(study, orphan._trial_id)
    assert proxy.lost.is_set(), "the fault was not injected"
    reap(study, orphan._trial_id)  # the next round
    trials = direct.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == trials[0].params
    assert trials[1].user_attrs == {"root": 0, "crashes": 1, "retry_of": 0}


def test_suggest_whose_commit_reply_is_lost_trains_the_stored_value(
    studies: tuple[optuna.Study, optuna.Study, FlakyProxy],
) -> None:
    """A retried suggest must return the value the database holds, not sample another (TPE's
    start-up trials sample at random) whose write the database drops against the stored one."""
    direct, study, proxy = studies
    study.sampler = optuna.samplers.RandomSampler()
    trial = ask(study)
    proxy.lose_commit_reply(b"INSERT INTO trial_params ")
    value = suggest_once(trial, "x", FloatParam(0.0, 1.0))
    assert proxy.lost.is_set(), "the fault was not injected"
    assert value == trial.params["x"]
    study.tell(trial, value)
    assert direct.get_trials()[0].params == {"x": value}


def test_upload_whose_commit_reply_is_lost_lists_the_checkpoint_once(
    studies: tuple[optuna.Study, optuna.Study, FlakyProxy], tmp_path: Path,
) -> None:
    """Optuna records an artifact on the trial before it copies the file: retried after a lost
    reply, it would list the checkpoint twice, once with no file behind it."""
    direct, study, proxy = studies
    trial = ask(study)
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    (tmp_path / "store").mkdir()
    store = FileSystemArtifactStore(str(tmp_path / "store"))
    proxy.lose_commit_reply(b"INSERT INTO trial_system_attributes ")
    artifact_id = upload_once(trial, store, str(checkpoint))
    assert proxy.lost.is_set(), "the fault was not injected"
    study.tell(trial, 0.5)
    listed = get_all_artifact_meta(direct.get_trials()[0], storage=direct._storage)
    assert [(a.artifact_id, a.filename) for a in listed] == [(artifact_id, "best.pt")]
    with store.open_reader(artifact_id) as f:
        assert f.read() == b"weights"
