"""The persistent worker: one process per device that pulls trials of a pipeline from the database
until every stage's budget is spent, then exits 0.

Data and a distillation teacher stay cached in the process between trials (the trainer's caches).
A failing trial rarely ends the worker: OOM and divergence become pruned trials with a reason, any
other error a failed one (ERROR_LIMIT in a row stop it: exit 1). SIGTERM stops the running trial
at its next step, hands it back for another worker to resume from its last epoch checkpoint, and
exits 0. A machine that cannot read the data hands its trial back the same way and exits 3.

A stage's trials are budget slots (`search.db.budget`): when every slot is held, by trials running
here and elsewhere or by one whose worker died, the worker waits (its beat thread reaps the dead
one and queues its retry, which the loop then takes) until the stage closes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
from optuna.trial import TrialState

from search.artifacts import Artifacts
from search.db import budget, pipeline, registry
from search.db import optuna_private as op
from search.db.storage import open_storage, redact, with_retry
from search.db.writes import ask, set_user_attrs
from search.runtime import objective, strategy
from search.runtime.beat import Beat
from search.runtime.retry import hand_back
from search.space.spec import Pipeline, Stage
from trainer.errors import DataUnavailable, Diverged, Interrupted, OutOfMemory

log = logging.getLogger("hpo.worker")
POLL_SECONDS = 2.0
GPU_LOCK_DIR = os.environ.get("HPO_GPU_LOCK_DIR", "/tmp/hpo-gpu-locks")
ERROR_LIMIT = 3  # a stage whose trials keep raising errors stops the worker after this many
# Exit codes beside 0 (done, or stopped by a signal): 1, trials kept raising errors; NO_DATA, this
# machine cannot read the dataset (an unmounted share, say). Neither is cured by starting the
# worker again at once, which is why the compose file caps its restarts.
EXIT_ERRORS = 1
EXIT_NO_DATA = 3


def rss_mb() -> float:
    """Resident memory of this process now (not the peak), in MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: the peak is the best we have
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_device(name: str) -> tuple[str, int | None]:
    """The device this worker trains on, and the descriptor of its GPU claim (None: no claim).
    `cpu` is answered without torch, so a CPU worker imports torch only when a trial trains."""
    if name == "cpu":
        return "cpu", None
    from trainer.device import claim_device, resolve_device

    claimed, lock = claim_device(name, GPU_LOCK_DIR)
    return str(resolve_device(claimed)), lock


class Worker:
    def __init__(
        self, url: str, study: str, *, device: str = "auto", artifacts: Artifacts, fault: str = ""
    ) -> None:
        self.url, self.study, self.artifacts, self.fault = url, study, artifacts, fault
        # The claim's lock lives as long as this process: keep the descriptor open.
        self.device, self._device_lock = worker_device(device)
        self.storage = open_storage(url)
        self.pipeline: Pipeline = pipeline.load(self.storage, study)
        self.stop = threading.Event()
        self.worker_id = 0
        self.trials_done = 0
        self.exit_code = 0  # non-zero: why this worker stopped before the pipeline was done
        self.reason = ""  # ... in words, for `hpo status`
        self.error = ""  # the last trial error
        self._studies: list[optuna.Study] = []

    def run(self) -> int:
        self._install_signals()
        self.worker_id = with_retry("register", lambda: registry.register_worker(
            self.storage.engine, self.study, self.device))
        log.info("worker %d on %s: study %r at %s", self.worker_id, self.device, self.study,
                 redact(self.url))
        self._studies = with_retry("load stages", lambda: [
            pipeline.load_stage_study(self.storage, self.study, s) for s in self.pipeline.stages
        ])
        state, reason = "failed", "stopped by an error in the worker"
        try:
            with Beat(self.storage, self.worker_id, lambda: self._studies) as beat:
                for index, stage in enumerate(self.pipeline.stages):
                    if not self._run_stage(index, stage, beat):
                        break
            if self.exit_code:
                # Non-zero, so `hpo run`, a restart policy and whoever reads the exit code see
                # that this worker stopped for a reason of its own, not because the search is done.
                reason = self.reason
                return self.exit_code
            state, reason = ("stopped", "") if self.stop.is_set() else ("done", "")
            return 0
        finally:
            with_retry("sign off", lambda: registry.touch_worker(
                self.storage.engine, self.worker_id, state=state, current=reason[:256],
                trials_done=self.trials_done))

    def _run_stage(self, index: int, stage: Stage, beat: Beat) -> bool:
        """Run trials of `stage` until it closes (`search.db.budget`); False when the worker must
        stop. Every stage before it is closed: this loop is the only way past one."""
        opened = with_retry("open stage", lambda: pipeline.open_stage(
            self.storage, self.study, self.pipeline, index))
        study = with_retry("load stage", lambda: pipeline.load_stage_study(
            self.storage, self.study, stage,
            sampler=strategy.make_sampler(stage, seed=self.worker_id * 1_000 + index),
            pruner=strategy.make_pruner(stage),
        ))
        ctx = objective.TrialContext(
            study=self.study, pipeline=self.pipeline, stage=stage, carried=opened.carried,
            artifacts=self.artifacts, device=self.device,
            worker=f"{socket.gethostname()}:{os.getpid()}#{self.worker_id}", fault=self.fault,
        )
        errors, idle = 0, False
        while not self.stop.is_set():
            trial = ask(study)  # exactly once, within the budget, retried through an outage
            if trial is None:
                counts, limit = with_retry("count trials", lambda: pipeline.stage_state(study))
                if budget.closed(counts, limit):
                    if budget.exhausted(counts, limit) and counts.finished < stage.trials:
                        log.info("stage %s: all %d configurations of its space are trained;"
                                 " closed early", stage.name, counts.configurations)
                    return True
                if not idle:
                    # A slot is held by a trial running elsewhere, perhaps one whose worker died:
                    # the reaper (in our beat thread too) fails it and queues its retry, which
                    # this loop then takes.
                    log.info("stage %s: every slot of %s is held (%d running); waiting for one",
                             stage.name, limit.trials, counts.running)
                    beat.note(current=f"{stage.name}: waiting for a slot")
                    idle = True
                self.stop.wait(POLL_SECONDS)
                continue
            idle = False
            outcome = self._run_trial(study, trial, ctx, beat)
            if outcome == "no data":
                self.exit_code, self.reason = EXIT_NO_DATA, f"cannot read the data: {self.error}"
                return False
            if outcome == "duplicate":
                continue  # not the configuration's fault, nor a reason to stop
            if outcome == "error":
                errors += 1
                if errors >= ERROR_LIMIT:
                    log.error("stage %s: %d trials in a row raised errors; stopping this worker",
                              stage.name, errors)
                    self.exit_code = EXIT_ERRORS
                    self.reason = f"{errors} trials in a row raised errors: {self.error}"
                    return False
            else:
                errors = 0
        return False

    def _run_trial(
        self, study: optuna.Study, trial: optuna.Trial, ctx: objective.TrialContext, beat: Beat
    ) -> str:
        beat.watch(op.trial_id(trial))
        beat.note(current=f"{ctx.stage.name}#{trial.number}")
        log.info("stage %s trial %d: start", ctx.stage.name, trial.number)
        started = time.monotonic()
        try:
            outcome = self._train_and_tell(study, trial, ctx)
        except optuna.exceptions.UpdateFinishedTrialError:
            # A reaper failed it while we ran it (our heartbeat was late: a stalled machine or a
            # long outage) and queued a retry; our result must not overwrite that.
            outcome = "taken over"
            log.warning("stage %s trial %d was failed by a reaper while running here; its retry"
                        " is queued", ctx.stage.name, trial.number)
        finally:
            beat.watch(None)
        if outcome not in ("interrupted", "taken over", "no data", "duplicate"):
            # Only a handed-back or re-queued trial resumes; others' optimizer state is dead weight.
            (objective.checkpoint_dir(ctx, trial) / objective.LAST_CHECKPOINT).unlink(
                missing_ok=True)
        self.trials_done += 1
        beat.note(trials_done=self.trials_done, current="")
        log.info("stage %s trial %d: %s in %.1fs", ctx.stage.name, trial.number, outcome,
                 time.monotonic() - started)
        return outcome

    def _train_and_tell(
        self, study: optuna.Study, trial: optuna.Trial, ctx: objective.TrialContext
    ) -> str:
        outcome = "complete"
        try:
            value, _ = objective.run(trial, ctx, self.stop)
            self._tell(study, trial, TrialState.COMPLETE, value)
        except optuna.TrialPruned:
            outcome = "pruned"
            self._tell(study, trial, TrialState.PRUNED)
        except objective.Duplicate as e:
            # Failed, so it gives its slot back; the next trial samples knowing the holder.
            outcome = "duplicate"
            self._tell(study, trial, TrialState.FAIL, fail_reason="duplicate", error=str(e))
        except (OutOfMemory, Diverged) as e:
            outcome = "oom" if isinstance(e, OutOfMemory) else "diverged"
            self._tell(study, trial, TrialState.PRUNED, fail_reason=outcome, error=str(e))
        except (Interrupted, DataUnavailable) as e:
            # Not the configuration's fault: the worker was told to stop, or this machine cannot
            # read the data. The trial goes back to the queue, keeping its slot, for another
            # worker to resume from its last epoch checkpoint.
            outcome = "interrupted" if isinstance(e, Interrupted) else "no data"
            self.error = str(e)
            self._record(trial, fail_reason="interrupted" if outcome == "interrupted"
                         else "no data", error=str(e))
            frozen = with_retry("read trial", lambda: op.storage_of(study).get_trial(
                op.trial_id(trial)))
            with_retry("hand back", lambda: hand_back(study, frozen))
        except optuna.exceptions.UpdateFinishedTrialError:
            raise
        except Exception as e:  # a bad config, a bug, a broken file: record it and go on
            outcome = "error"
            self.error = f"{type(e).__name__}: {e}"
            log.error("stage %s trial %d failed:\n%s", ctx.stage.name, trial.number,
                      traceback.format_exc())
            self._tell(study, trial, TrialState.FAIL, fail_reason="error", error=self.error)
        return outcome

    def _tell(
        self, study: optuna.Study, trial: optuna.Trial, state: TrialState,
        value: float | None = None, **attrs: Any,
    ) -> None:
        """Record `attrs` on the trial, then finish it in `state`."""
        self._record(trial, **attrs)
        # skip_if_finished: the reaper may have failed it during an outage (its retry is queued).
        with_retry("tell", lambda: study.tell(trial, value, state=state, skip_if_finished=True))

    def _record(self, trial: optuna.Trial, **attrs: Any) -> None:
        # The worker's memory after each trial: a leak across many trials (OOM retries, cached
        # data) shows up as a rising line in the dashboard.
        attrs["worker_rss_mb"] = round(rss_mb(), 1)
        with_retry(f"set {', '.join(attrs)}", lambda: set_user_attrs(trial, attrs))

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.warning("signal %d: finishing the current step, handing the trial back", signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
