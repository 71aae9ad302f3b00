"""Putting a trial back in the queue: after its worker died (heartbeat went stale) or handed it
back (SIGTERM). The copy keeps the parameters, so it trains the same configuration, and names the
first attempt, whose checkpoint folder it resumes from. Each is written exactly once, and the
trial is failed and its copy queued in one transaction (`writes.fail_running`), so the trial's
budget slot passes straight to the copy (`search.db.budget`)."""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.db import budget, pipeline
from search.db import optuna_private as op
from search.db.attrs import CANDIDATE, CRASHES, RETRY_OF, ROOT
from search.db.writes import fail_running

MAX_CRASH_RETRIES = 1  # a configuration that killed its worker twice is failed for good
log = logging.getLogger(__name__)


def root_number(trial: FrozenTrial | optuna.Trial) -> int:
    """The number of the first attempt: its checkpoint folder is shared by all retries."""
    return int(trial.user_attrs.get(ROOT, trial.number))


def copy_attrs(trial: FrozenTrial, *, crashed: bool) -> dict[str, Any]:
    """The user attributes of a retry of `trial`."""
    attrs: dict[str, Any] = {
        ROOT: root_number(trial),
        CRASHES: int(trial.user_attrs.get(CRASHES, 0)) + int(crashed),
        RETRY_OF: trial.number,
    }
    if CANDIDATE in trial.user_attrs:  # a confirmation trial's retry re-runs the same one
        attrs[CANDIDATE] = trial.user_attrs[CANDIDATE]
    return attrs


def hand_back(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Fail the running `trial` (its worker was told to stop) and queue its copy in the same
    commit, so its slot is never free for a new trial in between. False when a reaper had
    already failed it (and queued the copy). A retry after a lost reply finds the trial failed
    and adds nothing."""
    if not budget.may_retry(*pipeline.stage_state(study)):
        return fail_running(study, trial, None)
    handed = fail_running(study, trial, copy_attrs(trial, crashed=False))
    if handed:
        log.info("trial %d handed back and re-queued", trial.number)
    return handed


def retry_of_crashed(
    study: optuna.Study, trial: FrozenTrial, max_crash_retries: int = MAX_CRASH_RETRIES
) -> dict[str, Any] | None:
    """The user attributes of a retry of `trial`, whose worker died; None when it gets none: a
    configuration that kills its worker must not loop forever (it is failed for good and its
    slot is free again), and a closed stage (`budget.may_retry`) waits for nobody."""
    if int(trial.user_attrs.get(CRASHES, 0)) >= max_crash_retries:
        log.warning("trial %d killed its worker again; failed for good", trial.number)
        return None
    if not budget.may_retry(*pipeline.stage_state(study)):
        log.info("trial %d died after its stage closed; not retried", trial.number)
        return None
    return copy_attrs(trial, crashed=True)


def reap(study: optuna.Study, trial_id: int, max_crash_retries: int = MAX_CRASH_RETRIES) -> None:
    """Fail the stale trial `trial_id` and queue its retry, in one transaction, so an outage
    between the two cannot leave it failed and never retried. Not retried here: the reaper runs
    beside the heartbeat, which must not wait out an outage behind it, and its next round finds
    whatever is left to do."""
    trial = op.storage_of(study).get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return
    attrs = retry_of_crashed(study, trial, max_crash_retries)
    if fail_running(study, trial, attrs):
        log.warning("trial %d failed: no heartbeat for over the grace period%s", trial.number,
                    "; re-queued" if attrs is not None else "")
