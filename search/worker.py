"""The persistent worker: one process per device that pulls trials of a pipeline from the database
until every stage's budget is spent, then exits 0.

Data and a distillation teacher stay cached in the process between trials (the trainer's caches).
A failing trial never ends the worker: OOM and divergence become pruned trials with a reason, any
other error a failed one. SIGTERM stops the running trial at its next step, hands it back for
another worker to resume from its last epoch checkpoint, and exits 0.
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

from search import algorithms, objective, pipeline, registry
from search.artifacts import Artifacts
from search.beat import Beat
from search.claim import ask
from search.retry import requeue, stage_closed
from search.space import Pipeline, Stage
from search.storage import open_storage, redact, set_user_attrs, with_retry
from trainer.errors import Diverged, Interrupted, OutOfMemory

log = logging.getLogger("hpo.worker")
POLL_SECONDS = 2.0
GPU_LOCK_DIR = os.environ.get("HPO_GPU_LOCK_DIR", "/tmp/hpo-gpu-locks")
ERROR_LIMIT = 3  # a stage whose trials keep raising errors stops the worker after this many


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
        self.gave_up = False  # ERROR_LIMIT trials in a row raised errors
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
        state = "failed"
        try:
            with Beat(self.storage, self.worker_id, lambda: self._studies) as beat:
                for index, stage in enumerate(self.pipeline.stages):
                    if not self._run_stage(index, stage, beat):
                        break
                else:
                    self._drain(beat)
            if self.gave_up:
                # Non-zero, so `hpo run`, a restart policy and whoever reads the exit code see
                # that this worker stopped because its trials fail, not because the search is done.
                return 1
            state = "stopped" if self.stop.is_set() else "done"
            return 0
        finally:
            with_retry("sign off", lambda: registry.touch_worker(
                self.storage.engine, self.worker_id, state=state, current="",
                trials_done=self.trials_done))

    def _run_stage(self, index: int, stage: Stage, beat: Beat) -> bool:
        """Run trials of `stage` until its budget is spent; False when the worker must stop."""
        if index > 0 and not self._wait_closed(self.pipeline.stages[index - 1]):
            return False
        opened = with_retry("open stage", lambda: pipeline.open_stage(
            self.storage, self.study, self.pipeline, index))
        study = with_retry("load stage", lambda: pipeline.load_stage_study(
            self.storage, self.study, stage,
            # Optuna's TPE and median pruner, with reads that stay cheap as the study grows.
            sampler=algorithms.TPESampler(
                n_startup_trials=stage.sampler.startup_trials, multivariate=True, group=True,
                constant_liar=True, seed=self.worker_id * 1_000 + index,
            ),
            pruner=algorithms.MedianPruner(
                n_startup_trials=stage.pruner.startup_trials,
                n_warmup_steps=stage.pruner.warmup_epochs,
            ),
        ))
        ctx = objective.TrialContext(
            study=self.study, pipeline=self.pipeline, stage=stage, carried=opened.carried,
            artifacts=self.artifacts, device=self.device,
            worker=f"{socket.gethostname()}:{os.getpid()}#{self.worker_id}", fault=self.fault,
        )
        errors = 0
        while not self.stop.is_set():
            counts = with_retry("count trials", lambda: pipeline.counts(study))
            if counts.finished >= stage.trials and counts.waiting == 0:
                return True
            trial = ask(study, counts.waiting)  # exactly once, retried through an outage
            state = self._run_trial(study, trial, ctx, beat)
            if state == "error":
                errors += 1
                if errors >= ERROR_LIMIT:
                    log.error("stage %s: %d trials in a row raised errors; stopping this worker",
                              stage.name, errors)
                    self.gave_up = True
                    return False
            else:
                errors = 0
        return False

    def _run_trial(
        self, study: optuna.Study, trial: optuna.Trial, ctx: objective.TrialContext, beat: Beat
    ) -> str:
        beat.watch(trial._trial_id)
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
        if outcome not in ("interrupted", "taken over"):
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
        except (OutOfMemory, Diverged) as e:
            outcome = "oom" if isinstance(e, OutOfMemory) else "diverged"
            self._tell(study, trial, TrialState.PRUNED, fail_reason=outcome, error=str(e))
        except Interrupted as e:
            outcome = "interrupted"
            self._tell(study, trial, TrialState.FAIL, fail_reason="interrupted", error=str(e))
            frozen = with_retry("read trial", lambda: study._storage.get_trial(trial._trial_id))
            if not with_retry("check stage", lambda: stage_closed(study)):
                requeue(study, frozen, crashed=False)
        except optuna.exceptions.UpdateFinishedTrialError:
            raise
        except Exception as e:  # a bad config, a bug, a broken file: record it and go on
            outcome = "error"
            log.error("stage %s trial %d failed:\n%s", ctx.stage.name, trial.number,
                      traceback.format_exc())
            self._tell(study, trial, TrialState.FAIL, fail_reason="error",
                       error=f"{type(e).__name__}: {e}")
        return outcome

    def _tell(
        self, study: optuna.Study, trial: optuna.Trial, state: TrialState,
        value: float | None = None, **attrs: Any,
    ) -> None:
        """Record `attrs` on the trial, then finish it in `state`."""
        # The worker's memory after each trial: a leak across many trials (OOM retries, cached
        # data) shows up as a rising line in the dashboard.
        attrs["worker_rss_mb"] = round(rss_mb(), 1)
        with_retry(f"set {', '.join(attrs)}", lambda: set_user_attrs(trial, attrs))
        # skip_if_finished: the reaper may have failed it during an outage (its retry is queued).
        with_retry("tell", lambda: study.tell(trial, value, state=state, skip_if_finished=True))

    def _wait_closed(self, stage: Stage) -> bool:
        """Block until `stage` has spent its budget (other workers may still be finishing it)."""
        study = with_retry("load stage", lambda: pipeline.load_stage_study(
            self.storage, self.study, stage))
        while not self.stop.is_set():
            if with_retry("count trials", lambda: pipeline.counts(study)).finished >= stage.trials:
                return True
            self.stop.wait(POLL_SECONDS)
        return False

    def _drain(self, beat: Beat) -> None:
        """Before exiting, wait until no trial of the pipeline runs or waits anywhere: a trial
        orphaned by a dead worker is failed by our reaper, or picked up again, before we leave."""
        while not self.stop.is_set():
            busy = 0
            for index, study in enumerate(self._studies):
                counts = with_retry("count trials", lambda s=study: pipeline.counts(s))
                if counts.waiting:
                    # Re-queued after we finished that stage: the normal loop runs waiting trials
                    # even when the budget is spent.
                    self._run_stage(index, self.pipeline.stages[index], beat)
                    if self.gave_up:
                        return
                busy += counts.running + counts.waiting
            if busy == 0:
                return
            self.stop.wait(POLL_SECONDS)

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.warning("signal %d: finishing the current step, handing the trial back", signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
