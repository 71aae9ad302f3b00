"""Putting a trial back in the queue: after its worker died (heartbeat went stale) or handed it
back (SIGTERM). The copy keeps the parameters, so it trains the same configuration, and names the
first attempt, whose checkpoint folder it resumes from."""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = "root"  # user attr: number of the first attempt of this configuration
CRASHES = "crashes"  # user attr: how many attempts of it died without a word
BUDGET = "budget"  # study user attr: the stage's budget of finished trials

log = logging.getLogger(__name__)


def root_number(trial: FrozenTrial | optuna.Trial) -> int:
    """The number of the first attempt: its checkpoint folder is shared by all retries."""
    return int(trial.user_attrs.get(ROOT, trial.number))


def requeue(study: optuna.Study, trial: FrozenTrial, *, crashed: bool) -> None:
    """Enqueue a WAITING copy of `trial` with the same parameters."""
    attrs: dict[str, Any] = {
        ROOT: root_number(trial),
        CRASHES: int(trial.user_attrs.get(CRASHES, 0)) + int(crashed),
        "retry_of": trial.number,
    }
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=attrs,
        )
    )
    log.info("trial %d re-queued (%s)", trial.number, "crashed" if crashed else "handed back")


class Requeue:
    """Heartbeat-stale callback: a trial whose worker died is retried, up to `max_crash_retries`
    times per configuration, so a configuration that kills its worker cannot loop forever."""

    def __init__(self, max_crash_retries: int = 1) -> None:
        self.max_crash_retries = max_crash_retries

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if int(trial.user_attrs.get(CRASHES, 0)) >= self.max_crash_retries:
            log.warning("trial %d died again; not retried", trial.number)
            return
        if stage_closed(study):
            log.info("trial %d died after its stage closed; not retried", trial.number)
            return
        from search.storage import with_retry  # storage imports this module for Requeue

        # The trial is already failed: if the database blinks now, the retry must still be queued.
        with_retry("re-queue", lambda: requeue(study, trial, crashed=True))


def stage_closed(study: optuna.Study) -> bool:
    """The stage's budget is spent: a retry would only be overshoot nobody waits for."""
    budget = study.user_attrs.get(BUDGET)
    if budget is None:
        return False
    from search.pipeline import counts  # pipeline imports this module for BUDGET

    return counts(study).finished >= int(budget)
