"""A stage's budget, defined once: the rules that the worker loop, the reaper, `hpo status` and
the report all use.

A stage of budget B is a set of B slots. A trial holds a slot while it waits, runs or is finished
(complete or pruned); a failed trial gives its slot back. So:

- a new trial is created only when a slot is free, decided in the transaction that takes it
  (`claim.ask`), under the lock on the study's row, so W workers asking at once cannot overshoot;
- a trial whose worker died keeps its slot until the reaper fails it, and the reaper queues its
  retry in the same commit, so the slot passes straight to the retry: a live worker that finds
  every slot taken waits for it instead of filling the stage with new trials;
- a SIGTERM hand-back is failed and queued in one commit too, and keeps its slot the same way;
- a configuration that killed its worker twice is failed for good, and its slot is free again;
- the stage closes when B trials are finished: exactly B, with any number of workers.

The budget is the stage study's user attribute `budget` (written by `hpo create`), read in the
database, so every worker sees one figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import sqlalchemy as sa
from optuna.storages._rdb import models
from optuna.trial import TrialState

BUDGET = "budget"  # study user attr: the stage's budget of finished trials

_TRIALS = models.TrialModel.__table__
_STUDY_ATTRS = models.StudyUserAttributeModel.__table__


@dataclass(frozen=True)
class Counts:
    """Trials of one stage study by state."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def occupied(self) -> int:
        """Slots held: finished, running and waiting trials."""
        return self.finished + self.running + self.waiting


def closed(counts: Counts, budget: int | None) -> bool:
    """The stage's budget is spent: B trials finished. (None: a study with no budget.)"""
    return budget is not None and counts.finished >= budget


def free_slots(counts: Counts, budget: int | None) -> int:
    """How many new trials may be created now."""
    if budget is None:
        return 1
    return max(0, budget - counts.occupied)


def may_retry(counts: Counts, budget: int | None) -> bool:
    """Whether a dead or handed-back trial gets a retry: always while the stage is open (the
    trial's own slot passes to it). A closed stage can hold a running trial only if it was
    overshot (a study from before slots, or a budget lowered by hand); its retry would be a
    trial nobody waits for."""
    return not closed(counts, budget)


def count(conn: sa.Connection, study_id: int) -> Counts:
    """The stage's trials by state, counted in the database (a worker asks before each trial;
    loading every trial of a large study each time would cost more than the trial bookkeeping)."""
    rows = conn.execute(
        sa.select(_TRIALS.c.state, sa.func.count())
        .where(_TRIALS.c.study_id == study_id)
        .group_by(_TRIALS.c.state)
    )
    by_state = {TrialState[s] if isinstance(s, str) else TrialState(s): n for s, n in rows}
    return Counts(
        complete=by_state.get(TrialState.COMPLETE, 0), pruned=by_state.get(TrialState.PRUNED, 0),
        failed=by_state.get(TrialState.FAIL, 0), running=by_state.get(TrialState.RUNNING, 0),
        waiting=by_state.get(TrialState.WAITING, 0),
    )


def read_budget(conn: sa.Connection, study_id: int) -> int | None:
    """The stage's budget as the database holds it (None: not a stage study)."""
    value = conn.execute(
        sa.select(_STUDY_ATTRS.c.value_json)
        .where(_STUDY_ATTRS.c.study_id == study_id, _STUDY_ATTRS.c.key == BUDGET)
    ).scalar()
    return None if value is None else int(json.loads(value))


def state(engine: sa.Engine, study_id: int) -> tuple[Counts, int | None]:
    """Counts and budget of a stage, read together."""
    with engine.connect() as conn:
        return count(conn, study_id), read_budget(conn, study_id)
