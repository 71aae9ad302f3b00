"""Trials written exactly once, however the connection fails.

When the reply to a commit is lost (the network drops, the server restarts), the caller cannot
tell whether the commit happened. Retrying `study.ask()` then makes a second trial and leaves the
first RUNNING with nobody on it, until the reaper fails it a grace period or two later and
re-queues it as if its worker had crashed; retrying `study.add_trial` queues a configuration
twice, and it runs twice. (Optuna's own storage retries a failed trial insert up to five times,
with the same effect.) So the worker writes the trials it takes and the copies it queues in
transactions of its own, each leaving a mark by which a retry recognises that the first attempt
landed:

- `ask`: takes the oldest waiting trial, or a new one if the stage has a free budget slot
  (`search.db.budget`), and in the same transaction records its first heartbeat and a claim token
  (a system attribute, not shown as a user attribute); after a connection error it looks for
  its token before it tries again.
- `queue_copy`: inserts a WAITING copy of a trial, unless the study already holds one (the copy
  names the trial it retries in its user attribute `retry_of`).
- `reserve`: in a finite space, records which configuration a trial holds, unless another trial
  holds it already: two workers that sampled the same untried configuration at once cannot both
  train it.
- `fail_running`: fails a stale trial and queues its copy in the same transaction: Optuna's
  `fail_stale_trials` commits the failure first and calls back for the retry afterwards, and a
  connection lost in between leaves the trial failed and never retried.
- `queue_candidates`: a confirmation stage's re-runs, each queued once however many workers
  open the stage, with the stage's budget set to their number in the same commit.
- `queue_start`: a stage's start configurations, each queued once however often or from how
  many hosts at once `hpo create` runs.
- `set_user_attrs`: a trial's user attributes in one upsert (a repeat writes the same values),
  instead of Optuna's two transactions per attribute.
- `pass_budget_on`: closes a stage with patience that stopped improving, moving its unspent
  budget to the next stage, only while the stage is open: run twice, it moves the budget once.

Every transaction here that adds a trial first locks the study's row, so budget slots are counted
and trial numbers given (as Optuna gives them) one writer at a time; trial ids of a study become
visible in increasing order (`algorithms.py` relies on it).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import optuna
import sqlalchemy as sa
import sqlalchemy.dialects.postgresql as sa_postgresql
import sqlalchemy.dialects.sqlite as sa_sqlite
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from search.db import budget
from search.db import optuna_private as op
from search.db.attrs import CANDIDATE, CLAIM, CONFIGURATION, RETRY_OF, START
from search.db.optuna_private import (
    BEATS,
    PARAMS,
    STUDIES,
    STUDY_ATTRS,
    SYSTEM_ATTRS,
    TRIALS,
    USER_ATTRS,
)
from search.db.storage import with_retry

log = logging.getLogger(__name__)

_TRIALS, _STUDIES, _PARAMS = TRIALS, STUDIES, PARAMS
_USER_ATTRS, _SYSTEM_ATTRS, _BEATS, _STUDY_ATTRS = USER_ATTRS, SYSTEM_ATTRS, BEATS, STUDY_ATTRS


def ask(study: optuna.Study) -> optuna.Trial | None:
    """What `study.ask()` does, exactly once and within the stage's budget: the oldest WAITING
    trial, else a new RUNNING trial if a budget slot is free, else None (every slot is held: by
    finished trials, or by trials running or waiting elsewhere). Retries through an outage.

    Without Optuna's look for a waiting trial: that look reads every unfinished trial of the
    study with all its attributes, a cost that grows with the number of workers; the count of
    waiting trials, taken under the study's lock, says whether there is one."""
    backend = op.study_rdb(study)
    if backend is None:  # not a database we write ourselves: Optuna's own ask, same rule
        counts, limit = _counts_in_memory(study)
        return study.ask() if counts.waiting or budget.free_slots(counts, limit) else None
    token = secrets.token_hex(8)

    def landed() -> FrozenTrial | None:
        taken = _claimed(backend.engine, op.study_id(study), token)
        if taken is None:
            return None
        log.warning("trial id %d was taken before the connection dropped; running it", taken)
        return backend.get_trial(taken)

    frozen = with_retry("ask", lambda: _claim(backend, op.study_id(study), token), landed=landed)
    if frozen is None:
        return None
    op.remember_trial(study, frozen)
    op.forget_trials(study)  # as `ask` does: sampling reads the study anew
    # Building the trial only reads (the trial, and the study for TPE's search space).
    return with_retry("ask", lambda: optuna.Trial(study, op.trial_id(frozen)))


def queue_copy(
    study: optuna.Study, trial: FrozenTrial, user_attrs: Mapping[str, Any]
) -> bool:
    """Queue a WAITING copy of `trial` (its parameters, and `user_attrs`, which must name it
    under `retry_of`) unless the study holds one already. Retries through an outage; False when
    a copy was there."""
    assert user_attrs.get(RETRY_OF) == trial.number
    backend = op.study_rdb(study)
    if backend is None:  # not a database we write ourselves: Optuna's own insert
        study.add_trial(optuna.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs=dict(user_attrs)))
        return True

    def attempt() -> bool:
        # The copy is looked for before every attempt, the first too: the caller may be
        # retrying a call of ours.
        with backend.engine.begin() as conn:
            return _insert_copy(conn, op.study_id(study), trial, user_attrs)

    return with_retry("re-queue", attempt)


def reserve(study: optuna.Study, trial: optuna.Trial, key: str) -> int | None:
    """Record, under the study's lock, that `trial` holds the configuration `key`; or, when a
    finished, running or waiting trial of the study holds it already, write nothing and return
    that trial's number. Retries through an outage: a retry after a lost reply finds the mark it
    left and writes none again."""
    backend = op.study_rdb(study)
    if backend is None:
        return None
    value = json.dumps(key)

    def attempt() -> int | None:
        with backend.engine.begin() as conn:
            _lock_study(conn, op.study_id(study))
            holder = conn.execute(
                sa.select(_TRIALS.c.number)
                .join(_SYSTEM_ATTRS, _SYSTEM_ATTRS.c.trial_id == _TRIALS.c.trial_id)
                .where(_TRIALS.c.study_id == op.study_id(study),
                       _TRIALS.c.trial_id != op.trial_id(trial),
                       _TRIALS.c.state.in_(budget.HOLDING),
                       _SYSTEM_ATTRS.c.key == CONFIGURATION, _SYSTEM_ATTRS.c.value_json == value)
                .limit(1)
            ).scalar()
            if holder is not None:
                return int(holder)
            mine = conn.execute(
                sa.select(_SYSTEM_ATTRS.c.trial_id)
                .where(_SYSTEM_ATTRS.c.trial_id == op.trial_id(trial),
                       _SYSTEM_ATTRS.c.key == CONFIGURATION)
            ).first()
            if mine is None:
                conn.execute(sa.insert(_SYSTEM_ATTRS).values(
                    trial_id=op.trial_id(trial), key=CONFIGURATION, value_json=value))
            return None

    return with_retry("reserve configuration", attempt)


def queue_candidates(study: optuna.Study, candidates: list[dict[str, Any]]) -> int:
    """Queue a confirmation stage's trials, one WAITING trial per candidate (its user attribute
    `candidate`, whose `key` tells two apart), and set the stage's budget to their number and
    `queued_only`, in one transaction under the study's lock: the workers that open the stage at
    once, or a retry after a lost reply, queue each candidate once. Returns how many the stage
    holds."""
    backend = op.study_rdb(study)
    assert backend is not None, "stage studies live in a database"

    def attempt() -> int:
        with backend.engine.begin() as conn:
            _lock_study(conn, op.study_id(study))
            queued = {v["key"] for v in _attr_values(conn, op.study_id(study), CANDIDATE)}
            for candidate in candidates:
                if candidate["key"] in queued:
                    continue
                trial_id, _, _ = _insert_trial(conn, op.study_id(study), TrialState.WAITING)
                conn.execute(sa.insert(_USER_ATTRS).values(
                    trial_id=trial_id, key=CANDIDATE, value_json=json.dumps(candidate)))
                queued.add(candidate["key"])
            _set_study_attrs(conn, op.study_id(study), {
                budget.BUDGET: len(queued), budget.QUEUED_ONLY: True})
            return len(queued)

    return with_retry("queue confirmation trials", attempt)


def queue_start(study: optuna.Study, points: Sequence[Mapping[str, Any]]) -> int:
    """Queue a stage's start configurations (`start` in a space file) as WAITING trials, in the
    list's order, each one's values where `Study.enqueue_trial` keeps them (the sampler fills in
    a param a point leaves out) and its index in the user attribute START, in one transaction
    under the study's lock: a second `hpo create`, or two at once, queues none again. Returns
    how many this call queued."""
    backend = op.study_rdb(study)
    assert backend is not None, "stage studies live in a database"

    def attempt() -> int:
        with backend.engine.begin() as conn:
            _lock_study(conn, op.study_id(study))
            queued = set(_attr_values(conn, op.study_id(study), START))
            added = 0
            for index, point in enumerate(points):
                if index in queued:
                    continue
                trial_id, _, _ = _insert_trial(conn, op.study_id(study), TrialState.WAITING)
                conn.execute(sa.insert(_USER_ATTRS).values(
                    trial_id=trial_id, key=START, value_json=json.dumps(index)))
                conn.execute(sa.insert(_SYSTEM_ATTRS).values(
                    trial_id=trial_id, key=op.FIXED_PARAMS, value_json=json.dumps(dict(point))))
                added += 1
            return added

    return with_retry("queue start configurations", attempt)


def _attr_values(conn: sa.Connection, study_id: int, key: str) -> list[Any]:
    """The values of user attribute `key` over the study's trials (the queued marks)."""
    return [json.loads(v) for v in conn.execute(
        sa.select(_USER_ATTRS.c.value_json)
        .join(_TRIALS, _TRIALS.c.trial_id == _USER_ATTRS.c.trial_id)
        .where(_TRIALS.c.study_id == study_id, _USER_ATTRS.c.key == key)
    ).scalars()]


def _set_study_attrs(conn: sa.Connection, study_id: int, attrs: Mapping[str, Any]) -> None:
    conn.execute(sa.delete(STUDY_ATTRS).where(STUDY_ATTRS.c.study_id == study_id,
                                              STUDY_ATTRS.c.key.in_(list(attrs))))
    conn.execute(sa.insert(STUDY_ATTRS), [
        {"study_id": study_id, "key": key, "value_json": json.dumps(value)}
        for key, value in attrs.items()])


def fail_running(
    study: optuna.Study, trial: FrozenTrial, copy_attrs: Mapping[str, Any] | None
) -> bool:
    """Fail `trial` if it is still RUNNING and, in the same transaction, queue a copy of it with
    `copy_attrs` (None: no copy). False when it was no longer running (its worker finished it
    after all, or another reaper was first). One attempt: the reaper's next round is the retry,
    and finds the trial failed and its copy queued if this commit landed."""
    backend = op.study_rdb(study)
    assert backend is not None, "the worker's reaper runs on a database"
    with backend.engine.begin() as conn:
        failed = conn.execute(
            sa.update(_TRIALS)
            .where(_TRIALS.c.trial_id == op.trial_id(trial), _TRIALS.c.state == TrialState.RUNNING)
            .values(state=TrialState.FAIL, datetime_complete=datetime.now(UTC).replace(tzinfo=None))
        ).rowcount
        if failed and copy_attrs is not None:
            _insert_copy(conn, op.study_id(study), trial, copy_attrs)
    return bool(failed)


def pass_budget_on(study: optuna.Study, next_study: str | None) -> dict[str, Any] | None:
    """If the stage is out of patience (`budget.out_of_patience`), close it: lower its budget to
    the trials it finished and raise the budget of the study named `next_study` (the next stage;
    None for the last) by the difference, recording what happened in the stage study's attribute
    `closed_early`, in one transaction under both studies' locks. Returns that record, or None
    when the stage was not out of patience (or is closed already: a second caller, or a retry
    after a lost reply, moves nothing). Retries through an outage."""
    backend = op.study_rdb(study)
    if backend is None:
        return None
    study_id = op.study_id(study)

    def attempt() -> dict[str, Any] | None:
        with backend.engine.begin() as conn:
            _lock_study(conn, study_id)
            limit = budget.read_limit(conn, study_id)
            counts = budget.count(conn, study_id, limit)
            if not budget.out_of_patience(counts, limit):
                return None
            assert limit.trials is not None and limit.patience is not None
            passed = max(0, limit.trials - counts.finished)
            next_id = None if next_study is None else conn.execute(
                sa.select(_STUDIES.c.study_id).where(_STUDIES.c.study_name == next_study)
            ).scalar()
            if next_id is not None:
                _lock_study(conn, next_id)
                later = budget.read_limit(conn, next_id).trials
                if later is not None:
                    _set_study_attr(conn, next_id, budget.BUDGET, later + passed)
            to = None if next_study is None or next_id is None else next_study.rsplit("/", 1)[-1]
            record = {"patience": limit.patience, "finished": counts.finished, "passed": passed,
                      "to": to}
            _set_study_attr(conn, study_id, budget.BUDGET, counts.finished)
            _set_study_attr(conn, study_id, budget.CLOSED_EARLY, record)
            return record

    return with_retry("close stage", attempt)


def _set_study_attr(conn: sa.Connection, study_id: int, key: str, value: Any) -> None:
    """A study user attribute as Optuna stores it, replacing any value it had."""
    conn.execute(sa.delete(_STUDY_ATTRS).where(_STUDY_ATTRS.c.study_id == study_id,
                                               _STUDY_ATTRS.c.key == key))
    conn.execute(sa.insert(_STUDY_ATTRS).values(study_id=study_id, key=key,
                                                value_json=json.dumps(value)))


def _insert_copy(
    conn: sa.Connection, study_id: int, trial: FrozenTrial, user_attrs: Mapping[str, Any]
) -> bool:
    _lock_study(conn, study_id)  # before the look, so two callers cannot both miss the copy
    if _copy_exists(conn, study_id, trial.number):
        return False
    trial_id, _, _ = _insert_trial(conn, study_id, TrialState.WAITING)
    _insert_params(conn, trial_id, trial.params, trial.distributions)
    conn.execute(sa.insert(_USER_ATTRS), [
        {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
        for key, value in user_attrs.items()
    ])
    return True


def _claim(
    backend: optuna.storages.RDBStorage, study_id: int, token: str
) -> FrozenTrial | None:
    with backend.engine.begin() as conn:
        _lock_study(conn, study_id)
        # Counted under the lock: no other ask can add a trial until this commit.
        limit = budget.read_limit(conn, study_id)
        counts = budget.count(conn, study_id, limit)
        popped = _pop_waiting(conn, study_id) if counts.waiting else None
        if popped is None:
            if not budget.free_slots(counts, limit):
                return None
            trial_id, number, start = _insert_trial(conn, study_id, TrialState.RUNNING)
        else:
            trial_id = popped
        conn.execute(sa.insert(_SYSTEM_ATTRS).values(
            trial_id=trial_id, key=CLAIM, value_json=json.dumps(token)))
        # The first beat in the same commit: a taken trial is never without one, so a worker
        # that dies right after taking it leaves an orphan that goes stale like any other.
        conn.execute(sa.insert(_BEATS).values(trial_id=trial_id))
    if popped is not None:
        return backend.get_trial(trial_id)  # a queued copy: its parameters and attributes
    return FrozenTrial(
        number=number, state=TrialState.RUNNING, value=None, values=None,
        datetime_start=_local(start), datetime_complete=None, params={}, distributions={},
        user_attrs={}, system_attrs={CLAIM: token}, intermediate_values={}, trial_id=trial_id,
    )


def _lock_study(conn: sa.Connection, study_id: int) -> None:
    """Hold the study's row until the commit. PostgreSQL and MySQL lock the row; SQLite has no
    row locks, and its driver begins a transaction only at the first write (a read before it
    would not be part of the transaction), so there a write that changes nothing comes first
    and holds the database's write lock."""
    if conn.dialect.name == "sqlite":
        conn.execute(sa.update(_STUDIES).where(_STUDIES.c.study_id == study_id)
                     .values(study_name=_STUDIES.c.study_name))
    else:
        conn.execute(sa.select(_STUDIES.c.study_id).where(_STUDIES.c.study_id == study_id)
                     .with_for_update())


def _counts_in_memory(study: optuna.Study) -> tuple[budget.Counts, budget.Limit]:
    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = budget.Counts(
        complete=states.count(TrialState.COMPLETE), pruned=states.count(TrialState.PRUNED),
        failed=states.count(TrialState.FAIL), running=states.count(TrialState.RUNNING),
        waiting=states.count(TrialState.WAITING))
    trials = study.user_attrs.get(budget.BUDGET)
    return counts, budget.Limit(None if trials is None else int(trials))


def _insert_trial(
    conn: sa.Connection, study_id: int, state: TrialState
) -> tuple[int, int, datetime | None]:
    """Insert a trial numbered after every other trial of the study: (trial id, number, start in
    naive UTC, as Optuna stores datetimes; None for a waiting trial)."""
    _lock_study(conn, study_id)  # a no-op when the caller holds it already
    start = datetime.now(UTC).replace(tzinfo=None) if state == TrialState.RUNNING else None
    key = conn.execute(sa.insert(_TRIALS).values(
        study_id=study_id, number=None, state=state, datetime_start=start,
    )).inserted_primary_key
    assert key is not None  # an INSERT of one row
    trial_id = int(key[0])
    number = conn.execute(
        sa.select(sa.func.count()).select_from(_TRIALS)
        .where(_TRIALS.c.study_id == study_id, _TRIALS.c.trial_id < trial_id)
    ).scalar_one()
    conn.execute(sa.update(_TRIALS).where(_TRIALS.c.trial_id == trial_id).values(number=number))
    return trial_id, number, start


def _pop_waiting(conn: sa.Connection, study_id: int) -> int | None:
    """Set the oldest WAITING trial of the study RUNNING; its id, or None when none waits."""
    while True:
        # SKIP LOCKED: workers popping at once take different trials instead of queueing on one
        # (PostgreSQL, MySQL); elsewhere the guarded update below settles who got it.
        trial_id = conn.execute(
            sa.select(_TRIALS.c.trial_id)
            .where(_TRIALS.c.study_id == study_id, _TRIALS.c.state == TrialState.WAITING)
            .order_by(_TRIALS.c.trial_id).limit(1).with_for_update(skip_locked=True)
        ).scalar()
        if trial_id is None:
            return None
        taken = conn.execute(
            sa.update(_TRIALS)
            .where(_TRIALS.c.trial_id == trial_id, _TRIALS.c.state == TrialState.WAITING)
            .values(state=TrialState.RUNNING, datetime_start=datetime.now(UTC).replace(tzinfo=None))
        ).rowcount
        if taken:
            return trial_id


def _insert_params(
    conn: sa.Connection, trial_id: int, params: Mapping[str, Any],
    distributions: Mapping[str, BaseDistribution],
) -> None:
    if params:
        conn.execute(sa.insert(_PARAMS), [
            {"trial_id": trial_id, "param_name": name,
             "param_value": distributions[name].to_internal_repr(value),
             "distribution_json": distribution_to_json(distributions[name])}
            for name, value in params.items()
        ])


def _claimed(engine: sa.Engine, study_id: int, token: str) -> int | None:
    """The running trial of the study that the ask with `token` took, if its commit landed."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(_TRIALS.c.trial_id)
            .join(_SYSTEM_ATTRS, _SYSTEM_ATTRS.c.trial_id == _TRIALS.c.trial_id)
            .where(_TRIALS.c.study_id == study_id, _TRIALS.c.state == TrialState.RUNNING,
                   _SYSTEM_ATTRS.c.key == CLAIM, _SYSTEM_ATTRS.c.value_json == json.dumps(token))
        ).scalar()


def _copy_exists(conn: sa.Connection, study_id: int, number: int) -> bool:
    return conn.execute(
        sa.select(_USER_ATTRS.c.trial_id)
        .join(_TRIALS, _TRIALS.c.trial_id == _USER_ATTRS.c.trial_id)
        .where(_TRIALS.c.study_id == study_id, _USER_ATTRS.c.key == RETRY_OF,
               _USER_ATTRS.c.value_json == json.dumps(number))
        .limit(1)
    ).first() is not None


def _local(utc: datetime | None) -> datetime | None:
    """A naive UTC datetime as the naive local time FrozenTrial carries."""
    return None if utc is None else utc.replace(tzinfo=UTC).astimezone().replace(tzinfo=None)


def set_user_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """`trial.set_user_attr` for every item, in one transaction of two statements (the trial's
    state, then one upsert of every key) instead of a transaction of two per key. Stored as
    Optuna stores them; raises UpdateFinishedTrialError as it does."""
    backend = op.rdb(trial.storage)
    upsert = _UPSERTS.get(backend.engine.dialect.name) if backend is not None else None
    if backend is None or upsert is None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    trials, table = _TRIALS, _USER_ATTRS
    insert = upsert(table).values([
        {"trial_id": op.trial_id(trial), "key": key, "value_json": json.dumps(value)}
        for key, value in attrs.items()
    ])
    with backend.engine.begin() as conn:
        state = conn.execute(
            sa.select(trials.c.state).where(trials.c.trial_id == op.trial_id(trial))
        ).scalar_one()
        backend.check_trial_is_updatable(
            op.trial_id(trial), TrialState[state] if isinstance(state, str) else state)
        conn.execute(insert.on_conflict_do_update(
            index_elements=[table.c.trial_id, table.c.key],
            set_={"value_json": insert.excluded.value_json},
        ))
    # As Trial.set_user_attr does after its write, so trial.user_attrs shows them.
    op.cached_trial(trial).user_attrs.update(attrs)


# INSERT ... ON CONFLICT DO UPDATE, by dialect; elsewhere (MySQL) Optuna writes key by key.
_UPSERTS: dict[str, Callable[[Any], Any]] = {
    "postgresql": sa_postgresql.insert,
    "sqlite": sa_sqlite.insert,
}
