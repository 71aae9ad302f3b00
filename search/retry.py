"""Putting a trial back in the queue: after its worker died (heartbeat went stale) or handed it
back (SIGTERM). The copy keeps the parameters, so it trains the same configuration, and names the
first attempt, whose checkpoint folder it resumes from. Each is written exactly once
(`claim.py`): a stale trial is failed and its copy queued in one transaction."""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = "root"  # user attr: number of the first attempt of this configuration
CRASHES = "crashes"  # user attr: how many attempts of it died without a word
RETRY_OF = "retry_of"  # user attr: the number of the attempt this one retries
BUDGET = "budget"  # study user attr: the stage's budget of finished trials

log = logging.getLogger(__name__)


def root_number(trial: FrozenTrial | optuna.Trial) -> int:
    """The number of the first attempt: its checkpoint folder is shared by all retries."""
    return int(trial.user_attrs.get(ROOT, trial.number))


def copy_attrs(trial: FrozenTrial, *, crashed: bool) -> dict[str, Any]:
    """The user attributes of a retry of `trial`."""
    return {
        ROOT: root_number(trial),
        CRASHES: int(trial.user_attrs.get(CRASHES, 0)) + int(crashed),
        RETRY_OF: trial.number,
    }


def requeue(study: optuna.Study, trial: FrozenTrial, *, crashed: bool) -> None:
    """Enqueue a WAITING copy of `trial` with the same parameters, once: a call repeated after a
    lost reply finds the copy and adds none. Retries through an outage."""
    from search.claim import queue_copy  # claim imports storage, which imports this module

    if queue_copy(study, trial, copy_attrs(trial, crashed=crashed)):
        log.info("trial %d re-queued (%s)", trial.number, "crashed" if crashed else "handed back")


def retry_of_crashed(
    study: optuna.Study, trial: FrozenTrial, max_crash_retries: int = 1
) -> dict[str, Any] | None:
    """The user attributes of a retry of `trial`, whose worker died; None when it gets none: a
    configuration that kills its worker must not loop forever, and once the stage's budget is
    spent a retry would only be overshoot nobody waits for."""
    if int(trial.user_attrs.get(CRASHES, 0)) >= max_crash_retries:
        log.warning("trial %d died again; not retried", trial.number)
        return None
    if stage_closed(study):
        log.info("trial %d died after its stage closed; not retried", trial.number)
        return None
    return copy_attrs(trial, crashed=True)


def reap(study: optuna.Study, trial_id: int, max_crash_retries: int = 1) -> None:
    """Fail the stale trial `trial_id` and queue its retry, in one transaction, so an outage
    between the two cannot leave it failed and never retried. Not retried here: the reaper runs
    beside the heartbeat, which must not wait out an outage behind it, and its next round finds
    whatever is left to do."""
    from search.claim import fail_running  # claim imports storage, which imports this module

    trial = study._storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return
    attrs = retry_of_crashed(study, trial, max_crash_retries)
    if fail_running(study, trial, attrs):
        log.warning("trial %d failed: no heartbeat for over the grace period%s", trial.number,
                    "; re-queued" if attrs is not None else "")


class Requeue:
    """Heartbeat-stale callback, for Optuna's own `fail_stale_trials` (the worker's reaper uses
    `reap`): the same retry, in a transaction after the one that failed the trial."""

    def __init__(self, max_crash_retries: int = 1) -> None:
        self.max_crash_retries = max_crash_retries

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if retry_of_crashed(study, trial, self.max_crash_retries) is not None:
            requeue(study, trial, crashed=True)


def stage_closed(study: optuna.Study) -> bool:
    """The stage's budget is spent: a retry would only be overshoot nobody waits for."""
    budget = study.user_attrs.get(BUDGET)
    if budget is None:
        return False
    from search.pipeline import counts  # pipeline imports this module for BUDGET

    return counts(study).finished >= int(budget)
