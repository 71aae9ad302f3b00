"""One stage as a worker runs it: take trials within the stage's budget (`search.db.budget`),
train each, tell its outcome (`search.runtime.outcome`), and wait for a slot when every one is
held, until the stage closes.

When every slot is held, by trials running here and elsewhere or by one whose worker died, the
runner waits: the worker's beat thread reaps the dead trial and queues its retry, which the loop
then takes.

A stage with `patience` is also closed from here: before each ask the runner lets the database
close it if its last N finished trials brought no improvement (`writes.pass_budget_on`, once,
whichever worker gets there first).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import optuna

from search.db import budget, pipeline
from search.db import optuna_private as op
from search.db.storage import with_retry
from search.db.writes import ask, pass_budget_on, set_user_attrs
from search.runtime import objective
from search.runtime.beat import Beat
from search.runtime.outcome import Outcome, classify
from search.runtime.retry import hand_back
from search.space.spec import Stage
from trainer.contract import LAST

log = logging.getLogger("hpo.worker")
POLL_SECONDS = 2.0
ERROR_LIMIT = 3  # a stage whose trials keep raising errors stops the worker after this many


class StageEnd(Enum):
    CLOSED = "closed"  # its budget is spent or its space exhausted: on to the next stage
    STOPPED = "stopped"  # the worker was told to stop (SIGTERM)
    ERRORS = "errors"  # ERROR_LIMIT trials in a row raised errors
    NO_DATA = "no data"  # this machine cannot read the dataset


@dataclass
class Tally:
    """What the worker did, for its row in `hpo_workers`."""

    trials_done: int = 0
    error: str = ""  # the last trial error, in words


class StageRunner:
    def __init__(
        self, study: optuna.Study, ctx: objective.TrialContext, beat: Beat,
        stop: threading.Event, tally: Tally, rss_mb: Callable[[], float],
    ) -> None:
        self.study, self.ctx, self.beat, self.stop, self.tally = study, ctx, beat, stop, tally
        self.rss_mb = rss_mb  # the worker's memory, recorded with each trial
        self.stage: Stage = ctx.stage

    def run(self) -> StageEnd:
        """Trials of the stage until it closes or the worker must stop."""
        errors, idle = 0, False
        while not self.stop.is_set():
            if self.stage.patience is not None:
                self._pass_budget_on()
            trial = ask(self.study)  # exactly once, within the budget, retried through an outage
            if trial is None:
                if self._closed():
                    return StageEnd.CLOSED
                if not idle:
                    self._waiting()
                    idle = True
                self.stop.wait(POLL_SECONDS)
                continue
            idle = False
            outcome = self.run_trial(trial)
            rule = outcome.rule
            if outcome == Outcome.NO_DATA:
                return StageEnd.NO_DATA
            if rule.neutral:
                continue
            errors = errors + 1 if rule.error else 0
            if errors >= ERROR_LIMIT:
                log.error("stage %s: %d trials in a row raised errors; stopping this worker",
                          self.stage.name, errors)
                return StageEnd.ERRORS
        return StageEnd.STOPPED

    def _closed(self) -> bool:
        counts, limit = with_retry("count trials", lambda: pipeline.stage_state(self.study))
        if not budget.closed(counts, limit):
            return False
        if budget.exhausted(counts, limit) and counts.finished < self.stage.trials:
            log.info("stage %s: all %d configurations of its space are trained%s; closed early",
                     self.stage.name, counts.configurations,
                     " (the one it carried in by an earlier stage)" if limit.trained else "")
        return True

    def _pass_budget_on(self) -> None:
        # Not to a confirmation stage: its budget is the number of re-runs it queues.
        stages = [s.name for s in self.ctx.pipeline.stages if s.confirms is None]
        index = stages.index(self.stage.name)
        later = stages[index + 1] if index + 1 < len(stages) else None
        record = pass_budget_on(
            self.study, None if later is None else pipeline.stage_study_name(self.ctx.study, later))
        if record is not None:
            log.info("stage %s: no better trial in its last %d; closed early with %d trials,"
                     " passing %d on to %s", self.stage.name, record["patience"],
                     record["finished"], record["passed"], record["to"] or "no later stage")

    def _waiting(self) -> None:
        # A slot is held by a trial running elsewhere, perhaps one whose worker died: the reaper
        # (in our beat thread too) fails it and queues its retry, which the loop then takes.
        counts, limit = with_retry("count trials", lambda: pipeline.stage_state(self.study))
        if limit.patience is not None and counts.streak is not None \
                and budget.free_slots(counts, limit) == 0 and counts.occupied < (limit.trials or 0):
            # Patience: the trials in flight may be the stage's last; no more until they finish.
            log.info("stage %s: %d trials without improvement and %d in flight make its"
                     " patience of %d; waiting for them", self.stage.name, counts.streak,
                     counts.running + counts.waiting, limit.patience)
        else:
            log.info("stage %s: every slot of %s is held (%d running); waiting for one",
                     self.stage.name, limit.trials, counts.running)
        self.beat.note(current=f"{self.stage.name}: waiting for a slot")

    def run_trial(self, trial: optuna.Trial) -> Outcome:
        name = self.stage.name
        self.beat.watch(op.trial_id(trial))
        self.beat.note(current=f"{name}#{trial.number}")
        log.info("stage %s trial %d: start", name, trial.number)
        started = time.monotonic()
        try:
            outcome = self._train_and_tell(trial)
        finally:
            self.beat.watch(None)
        if not outcome.rule.keep_checkpoint:
            # Only a handed-back or re-queued trial resumes; others' optimizer state is dead weight.
            (objective.checkpoint_dir(self.ctx, trial) / LAST).unlink(
                missing_ok=True)
        self.tally.trials_done += 1
        self.beat.note(trials_done=self.tally.trials_done, current="")
        log.info("stage %s trial %d: %s in %.1fs", name, trial.number, outcome.value,
                 time.monotonic() - started)
        return outcome

    def _train_and_tell(self, trial: optuna.Trial) -> Outcome:
        value: float | None = None
        error: BaseException | None = None
        try:
            value, _ = objective.run(trial, self.ctx, self.stop)
        except Exception as e:  # each kind of error is an outcome: see search.runtime.outcome
            error = e
        outcome = classify(error)
        rule = outcome.rule
        if outcome == Outcome.TAKEN_OVER:
            return self._taken_over(trial)
        attrs: dict[str, Any] = {}
        if rule.fail_reason is not None:
            attrs["fail_reason"] = rule.fail_reason
            attrs["error"] = self._describe(outcome, error)
        try:
            self._record(trial, attrs)
            if rule.hand_back:
                # Not the configuration's fault: the trial goes back to the queue, keeping its
                # slot, for another worker to resume from its last epoch checkpoint.
                frozen = with_retry("read trial", lambda: op.storage_of(self.study).get_trial(
                    op.trial_id(trial)))
                with_retry("hand back", lambda: hand_back(self.study, frozen))
            elif rule.state is not None:
                # skip_if_finished: a reaper may have failed it during an outage (its retry is
                # queued).
                state = rule.state
                with_retry("tell", lambda: self.study.tell(
                    trial, value, state=state, skip_if_finished=True))
        except optuna.exceptions.UpdateFinishedTrialError:
            return self._taken_over(trial)
        return outcome

    def _taken_over(self, trial: optuna.Trial) -> Outcome:
        # A reaper failed it while we ran it (our heartbeat was late: a stalled machine or a long
        # outage) and queued a retry; our result must not overwrite that.
        log.warning("stage %s trial %d was failed by a reaper while running here; its retry is"
                    " queued", self.stage.name, trial.number)
        return Outcome.TAKEN_OVER

    def _describe(self, outcome: Outcome, error: BaseException | None) -> str:
        """The error as the trial records it; the last error or hand-back reason is also the
        worker's, for its row in `hpo_workers`."""
        text = str(error)
        if outcome == Outcome.ERROR and error is not None:
            text = f"{type(error).__name__}: {error}"
            log.error("stage %s trial failed:\n%s", self.stage.name,
                      "".join(traceback.format_exception(error)))
        if outcome.rule.error or outcome.rule.hand_back:
            self.tally.error = text
        return text

    def _record(self, trial: optuna.Trial, attrs: dict[str, Any]) -> None:
        # The worker's memory after each trial: a leak across many trials (OOM retries, cached
        # data) shows up as a rising line in the dashboard.
        attrs["worker_rss_mb"] = round(self.rss_mb(), 1)
        with_retry(f"set {', '.join(attrs)}", lambda: set_user_attrs(trial, attrs))
