"""A stage's budget, defined once: the rules that the worker loop, the reaper, `hpo status` and
the report all use.

A stage of budget B is a set of B slots. A trial holds a slot while it waits, runs or is finished
(complete or pruned); a failed trial gives its slot back. So:

- a new trial is created only when a slot is free, decided in the transaction that takes it
  (`writes.ask`), under the lock on the study's row, so W workers asking at once cannot overshoot;
- a trial whose worker died keeps its slot until the reaper fails it, and the reaper queues its
  retry in the same commit, so the slot passes straight to the retry: a live worker that finds
  every slot taken waits for it instead of filling the stage with new trials;
- a SIGTERM hand-back is failed and queued in one commit too, and keeps its slot the same way;
- a configuration that killed its worker twice is failed for good, and its slot is free again;
- the stage closes when B trials are finished: exactly B, with any number of workers.

A confirmation stage (a space file's `confirm` table) creates no trials of its own: when it opens,
its re-runs of the best configurations are queued and its budget set to their number
(`writes.queue_candidates`, attribute `queued_only`), and it closes when none is left waiting or
running.

A stage whose space is finite (only categorical and stepped parameters: `search.space.grid`) trains
each configuration at most once: a new trial needs a configuration no trial holds yet as well as a
slot, and once every configuration is finished the stage closes early ("space exhausted"). The
configuration it carried in counts as one of them when an earlier stage's trial trained exactly
the configuration this stage's trials start from (same parameters, epochs and seed: attribute
`trained_before`, written when the stage opens, `search.db.pipeline.open_stage`); training it
again would give the same result.

A stage with `patience` N closes early too: when its last N finished trials (in the order they
finished) did not improve its best complete value and none of its trials is running or waiting
(`out_of_patience`), a worker lowers its budget to what it finished and raises the next stage's by
the rest, once (`writes.pass_budget_on`). So that it closes after exactly those N, no new trial is
created while the non-improving trials so far and the trials in flight make N: those in flight
could be the last ones (a worker waits for them, as for a slot).

The budget is the stage study's user attribute `budget`, the number of configurations its
attribute `space_size` and the patience its attribute `patience` (all written by `hpo create`),
read in the database, so every worker sees one figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from optuna.trial import TrialState

from search.db.attrs import CONFIGURATION
from search.db.optuna_private import (
    DIRECTIONS,
    STUDY_ATTRS,
    SYSTEM_ATTRS,
    TRIALS,
    VALUES,
    trial_value,
)

BUDGET = "budget"  # study user attr: the stage's budget of finished trials
SPACE_SIZE = "space_size"  # study user attr: its distinct configurations (absent: unbounded)
# study user attr: the configuration (`grid.key`) the stage carried in, when a trial of an earlier
# stage trained exactly it; it counts as held (absent: none)
TRAINED_BEFORE = "trained_before"
# study user attr, true once a confirmation stage queued its trials: it runs those and no others
QUEUED_ONLY = "queued_only"
PATIENCE = "patience"  # study user attr: finished trials without improvement that close it
# study user attr: how a stage closed for want of improvement: {"patience", "finished", "passed",
# "to"} (the next stage, None for the last)
CLOSED_EARLY = "closed_early"

_TRIALS, _SYSTEM_ATTRS, _STUDY_ATTRS = TRIALS, SYSTEM_ATTRS, STUDY_ATTRS
HOLDING = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


@dataclass(frozen=True)
class Limit:
    """What a stage may spend: trials (None: no budget) and, for a finite space, its distinct
    configurations."""

    trials: int | None
    configurations: int | None = None
    queued_only: bool = False  # a confirmation stage: no new trials, only the queued ones
    patience: int | None = None  # None: the stage spends its budget
    trained: str | None = None  # TRAINED_BEFORE: a configuration held from before the stage


@dataclass(frozen=True)
class Counts:
    """Trials of one stage study by state."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    # Distinct configurations held by finished, running and waiting trials (one that has not
    # reserved its configuration yet counts as one of its own); counted for finite spaces only.
    configurations: int = 0
    # Trials finished since the last that improved the stage's best complete value (None: no
    # complete trial yet); counted for stages with patience only.
    streak: int | None = None

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def occupied(self) -> int:
        """Slots held: finished, running and waiting trials."""
        return self.finished + self.running + self.waiting


def exhausted(counts: Counts, limit: Limit) -> bool:
    """Every configuration of a finite space is finished: nothing new is left to train."""
    return (limit.configurations is not None and counts.running == counts.waiting == 0
            and counts.configurations >= limit.configurations)


def closed(counts: Counts, limit: Limit) -> bool:
    """The stage is done: B trials finished, or its space exhausted."""
    spent = limit.trials is not None and counts.finished >= limit.trials
    drained = limit.queued_only and counts.running == counts.waiting == 0
    return spent or drained or exhausted(counts, limit)


def free_slots(counts: Counts, limit: Limit) -> int:
    """How many new trials may be created now."""
    if limit.queued_only:
        return 0
    free = 1 if limit.trials is None else max(0, limit.trials - counts.occupied)
    if limit.configurations is not None:
        free = min(free, max(0, limit.configurations - counts.configurations))
    if limit.patience is not None and counts.streak is not None:
        in_flight = counts.running + counts.waiting
        free = min(free, max(0, limit.patience - counts.streak - in_flight))
    return free


def out_of_patience(counts: Counts, limit: Limit) -> bool:
    """The stage is open, its last `patience` finished trials did not improve its best, and none
    of its trials is running or waiting: it closes, passing its unspent budget on."""
    return (limit.patience is not None and limit.trials is not None
            and counts.streak is not None and counts.streak >= limit.patience
            and counts.running == counts.waiting == 0 and not closed(counts, limit))


def may_retry(counts: Counts, limit: Limit) -> bool:
    """Whether a dead or handed-back trial gets a retry: always while the stage is open (the
    trial's own slot passes to it). A closed stage can hold a running trial only if it was
    overshot (a study from before slots, or a budget lowered by hand); its retry would be a
    trial nobody waits for."""
    return not closed(counts, limit)


def count(conn: sa.Connection, study_id: int, limit: Limit | None = None) -> Counts:
    """The stage's trials by state, counted in the database (a worker asks before each trial;
    loading every trial of a large study each time would cost more than the trial bookkeeping),
    and its held configurations when `limit` says the space is finite."""
    rows = conn.execute(
        sa.select(_TRIALS.c.state, sa.func.count())
        .where(_TRIALS.c.study_id == study_id)
        .group_by(_TRIALS.c.state)
    )
    by_state = {_state(s): n for s, n in rows}
    configurations = 0
    if limit is not None and limit.configurations is not None:
        configurations = _configurations(conn, study_id, limit.trained)
    streak = None
    if limit is not None and limit.patience is not None:
        streak = _streak(conn, study_id)
    return Counts(
        complete=by_state.get(TrialState.COMPLETE, 0), pruned=by_state.get(TrialState.PRUNED, 0),
        failed=by_state.get(TrialState.FAIL, 0), running=by_state.get(TrialState.RUNNING, 0),
        waiting=by_state.get(TrialState.WAITING, 0), configurations=configurations,
        streak=streak,
    )


def _streak(conn: sa.Connection, study_id: int) -> int | None:
    """Finished trials since the last one that improved the best complete value, in the order
    they finished (a pruned trial never improves it); None before the first complete trial."""
    direction = conn.execute(
        sa.select(DIRECTIONS.c.direction)
        .where(DIRECTIONS.c.study_id == study_id, DIRECTIONS.c.objective == 0)
    ).scalar_one()
    sign = 1.0 if str(getattr(direction, "name", direction)).upper() == "MAXIMIZE" else -1.0
    values = sa.and_(VALUES.c.trial_id == _TRIALS.c.trial_id, VALUES.c.objective == 0)
    rows = conn.execute(
        sa.select(_TRIALS.c.state, VALUES.c.value, VALUES.c.value_type)
        .select_from(_TRIALS.outerjoin(VALUES, values))
        .where(_TRIALS.c.study_id == study_id,
               _TRIALS.c.state.in_((TrialState.COMPLETE, TrialState.PRUNED)))
        .order_by(_TRIALS.c.datetime_complete, _TRIALS.c.trial_id)
    )
    best: float | None = None
    since: int | None = None
    for state, value, kind in rows:
        if _state(state) == TrialState.COMPLETE and kind is not None:
            score = sign * trial_value(value, kind)
            if best is None or score > best:
                best, since = score, 0
                continue
        if since is not None:
            since += 1
    return since


def _configurations(conn: sa.Connection, study_id: int, trained: str | None = None) -> int:
    holding = sa.select(_TRIALS.c.trial_id).where(
        _TRIALS.c.study_id == study_id, _TRIALS.c.state.in_(HOLDING))
    marks = conn.execute(
        sa.select(_SYSTEM_ATTRS.c.trial_id, _SYSTEM_ATTRS.c.value_json)
        .where(_SYSTEM_ATTRS.c.trial_id.in_(holding), _SYSTEM_ATTRS.c.key == CONFIGURATION)
    ).all()
    trials = conn.execute(sa.select(sa.func.count()).select_from(holding.subquery())).scalar_one()
    # A trial that has not reserved its configuration yet (`writes.reserve`: still sampling, or
    # waiting) holds one nobody knows: count it on its own, so two workers cannot both be
    # promised the last untried configuration.
    held = {json.loads(value) for _, value in marks} | ({trained} if trained else set())
    return len(held) + trials - len(marks)


def _state(value: str | int) -> TrialState:
    return TrialState[value] if isinstance(value, str) else TrialState(value)


def read_limit(conn: sa.Connection, study_id: int) -> Limit:
    """The stage's budget, space size, patience, whether it runs queued trials only and the
    configuration an earlier stage trained for it, as the database holds them."""
    keys = (BUDGET, SPACE_SIZE, PATIENCE, QUEUED_ONLY, TRAINED_BEFORE)
    attrs = dict(conn.execute(
        sa.select(_STUDY_ATTRS.c.key, _STUDY_ATTRS.c.value_json)
        .where(_STUDY_ATTRS.c.study_id == study_id, _STUDY_ATTRS.c.key.in_(keys))
    ).all())
    trials, size, patience, queued, trained = (
        json.loads(attrs[k]) if k in attrs else None for k in keys)
    return Limit(None if trials is None else int(trials), None if size is None else int(size),
                 queued_only=bool(queued), patience=None if patience is None else int(patience),
                 trained=None if size is None or trained is None else str(trained))


def state(engine: sa.Engine, study_id: int) -> tuple[Counts, Limit]:
    """Counts and limit of a stage, read together."""
    with engine.connect() as conn:
        limit = read_limit(conn, study_id)
        return count(conn, study_id, limit), limit
