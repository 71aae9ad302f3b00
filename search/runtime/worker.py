"""The persistent worker: one process per device that pulls trials of a pipeline from the database
until every stage's budget is spent, then exits 0.

Data and a distillation teacher stay cached in the process between trials (the trainer's caches).
A failing trial rarely ends the worker: OOM and divergence become pruned trials with a reason, any
other error a failed one (ERROR_LIMIT in a row stop it: exit 1). SIGTERM stops the running trial
at its next step, hands it back for another worker to resume from its last epoch checkpoint, and
exits 0, or `stopped_exit_code` (`--stopped-exit-code`) when the search is not done yet (a
Kubernetes Job takes a pod's exit 0 for "the queue is empty"). A machine that cannot read the
data hands its trial back the same way and exits 3.

The parts: `Worker.open` does the set-up I/O (claims a device, opens the database, reads the
pipeline); `run` registers the worker, installs the signal handlers, and runs the stages in order
with `search.runtime.stages.StageRunner`, whose trials end in an `search.runtime.outcome.Outcome`.
The trainer is passed in (`train`, and `test`, which evaluates the winner on the test split once
the pipeline is done): the trainer's by default, stubs in load tests.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from types import FrameType

import optuna

from search.artifacts import Artifacts
from search.db import pipeline, registry, winner
from search.db.storage import open_storage, redact, with_retry
from search.runtime import objective, strategy
from search.runtime.beat import Beat
from search.runtime.stages import ERROR_LIMIT, StageEnd, StageRunner, Tally
from search.space.spec import Pipeline

log = logging.getLogger("hpo.worker")
GPU_LOCK_DIR = os.environ.get("HPO_GPU_LOCK_DIR", "/tmp/hpo-gpu-locks")
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
        self, url: str, study: str, pipe: Pipeline, storage: optuna.storages.RDBStorage, *,
        device: str, artifacts: Artifacts, fault: str = "",
        train: objective.Train = objective.train_lazily, device_lock: int | None = None,
        test: winner.Evaluate = winner.evaluate_lazily, stopped_exit_code: int = 0,
    ) -> None:
        self.url, self.study, self.pipeline, self.storage = url, study, pipe, storage
        self.stopped_exit_code = stopped_exit_code  # after a stop with the search not done
        self.device, self.artifacts, self.fault, self.train = device, artifacts, fault, train
        self.test = test  # evaluates the winner on the test split, once the pipeline is done
        self._device_lock = device_lock  # the GPU claim lives as long as this descriptor is open
        self.stop = threading.Event()
        self.worker_id = 0
        self.tally = Tally()
        self.exit_code = 0  # non-zero: why this worker stopped before the pipeline was done
        self.reason = ""  # ... in words, for `hpo status`
        self._studies: list[optuna.Study] = []

    @classmethod
    def open(
        cls, url: str, study: str, *, device: str = "auto", artifacts: Artifacts, fault: str = "",
        train: objective.Train = objective.train_lazily,
        test: winner.Evaluate = winner.evaluate_lazily, stopped_exit_code: int = 0,
    ) -> Worker:
        """Claim the device, open the database and read the study's pipeline."""
        name, lock = worker_device(device)
        storage = open_storage(url)
        return cls(url, study, pipeline.load(storage, study), storage, device=name,
                   artifacts=artifacts, fault=fault, train=train, device_lock=lock, test=test,
                   stopped_exit_code=stopped_exit_code)

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
        done = False
        try:
            with Beat(self.storage, self.worker_id, lambda: self._studies) as beat:
                ends = []
                for index in range(len(self.pipeline.stages)):
                    ends.append(self._run_stage(index, beat))
                    if ends[-1] != StageEnd.CLOSED:
                        break
                done = ends.count(StageEnd.CLOSED) == len(self.pipeline.stages)
                if done:
                    beat.note(current="testing the winner")
                    self._test_winner()
            if self.exit_code:
                # Non-zero, so `hpo run`, a restart policy and whoever reads the exit code see
                # that this worker stopped for a reason of its own, not because the search is done.
                reason = self.reason
                return self.exit_code
            state, reason = ("stopped", "") if self.stop.is_set() else ("done", "")
            return self.stopped_exit_code if self.stop.is_set() and not done else 0
        finally:
            with_retry("sign off", lambda: registry.touch_worker(
                self.storage.engine, self.worker_id, state=state, current=reason[:256],
                trials_done=self.tally.trials_done))

    def _run_stage(self, index: int, beat: Beat) -> StageEnd:
        """Every stage before `index` is closed: the runner's loop is the only way past one."""
        stage = self.pipeline.stages[index]
        opened = with_retry("open stage", lambda: pipeline.open_stage(
            self.storage, self.study, self.pipeline, index))
        warm = []
        if stage.warm_start:  # every earlier stage is closed: the same trials for every worker
            warm = with_retry("read warm trials", lambda: pipeline.warm_trials(
                self.storage, self.study, self.pipeline, index, opened.carried))
            log.info("stage %s: TPE warm-started with %d earlier trials that share its base",
                     stage.name, len(warm))
        study = with_retry("load stage", lambda: pipeline.load_stage_study(
            self.storage, self.study, stage,
            sampler=strategy.make_sampler(stage, seed=self.worker_id * 1_000 + index, warm=warm,
                                          trained=opened.trained),
            pruner=strategy.make_pruner(stage),
        ))
        ctx = objective.TrialContext(
            study=self.study, pipeline=self.pipeline, stage=stage, carried=opened.carried,
            artifacts=self.artifacts, device=self.device,
            worker=f"{socket.gethostname()}:{os.getpid()}#{self.worker_id}", fault=self.fault,
            train=self.train, trained=opened.trained,
        )
        end = StageRunner(study, ctx, beat, self.stop, self.tally, rss_mb).run()
        if end == StageEnd.NO_DATA:
            self.exit_code, self.reason = EXIT_NO_DATA, f"cannot read the data: {self.tally.error}"
        elif end == StageEnd.ERRORS:
            self.exit_code = EXIT_ERRORS
            self.reason = f"{ERROR_LIMIT} trials in a row raised errors: {self.tally.error}"
        return end

    def _test_winner(self) -> None:
        """The pipeline is done: the winner's test metrics, once for the pipeline (a worker
        that finds them stored does nothing). A failure here is logged, not the worker's exit:
        `hpo export` computes them where this could not."""
        try:
            metrics = with_retry("test the winner", lambda: winner.test_once(
                self.storage, self.study, self.pipeline, self.artifacts, self.device,
                self.test))
        except Exception as e:
            log.warning("the winner's test metrics were not computed: %s: %s",
                        type(e).__name__, e)
            return
        if metrics is not None:
            log.info("the winner's test metrics: %s", ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.warning("signal %d: finishing the current step, handing the trial back", signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
