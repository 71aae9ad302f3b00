"""A worker's background thread: the heartbeat of its running trial, its own `last_seen`, and the
reaper that fails (and re-queues) trials whose worker died.

The reaper runs here rather than only when a trial starts, so orphans are found even while every
live worker is busy with a long trial. Every database call is guarded: an outage only delays
beats, it never kills the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import optuna

from search.db import optuna_private as op
from search.db import registry
from search.db.storage import GRACE_SECONDS, HEARTBEAT_SECONDS, root_cause
from search.runtime.retry import reap

log = logging.getLogger(__name__)
REAP_SECONDS = float(max(1, min(HEARTBEAT_SECONDS, GRACE_SECONDS // 4)))


class Beat:
    def __init__(
        self,
        storage: optuna.storages.RDBStorage,
        worker_id: int,
        studies: Callable[[], list[optuna.Study]],
    ) -> None:
        self.storage, self.worker_id, self.studies = storage, worker_id, studies
        self.trial_id: int | None = None
        self._state: dict[str, object] = {}  # worker registry values not written yet
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpo-beat", daemon=True)

    def __enter__(self) -> Beat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def watch(self, trial_id: int | None) -> None:
        """Beat for `trial_id` from now on (None: no trial). Its first beat was written with the
        trial when `writes.ask` took it, so none is written here."""
        with self._lock:
            self.trial_id = trial_id

    def note(self, **values: object) -> None:
        """Worker registry values (`current`, `trials_done`) for `hpo status`, written with the
        next beat rather than at once: per trial that would be two more commits, and status is
        read by people, for whom a few seconds' lag does not matter."""
        with self._lock:
            self._state.update(values)

    def _run(self) -> None:
        next_beat = next_reap = 0.0
        while not self._done.is_set():
            now = time.monotonic()
            if now >= next_beat:
                ok = self._beat()
                # After a failed beat try again soon: the outage may be over in a second.
                next_beat = now + (HEARTBEAT_SECONDS if ok else 1.0)
            if now >= next_reap:
                self._guarded("reaper", self._reap)
                next_reap = now + REAP_SECONDS
            # A short tick: the reaper interval, not this loop, should bound detection time.
            self._done.wait(0.1)

    def _beat(self) -> bool:
        with self._lock:
            trial_id, state = self.trial_id, self._state
            self._state = {}
        ok = True
        if trial_id is not None:
            ok = self._guarded("heartbeat", lambda: self.storage.record_heartbeat(trial_id))
        if not self._guarded("worker beat", lambda: registry.touch_worker(
                self.storage.engine, self.worker_id, **state)):
            with self._lock:  # written with the next beat, unless newer values came meanwhile
                self._state = {**state, **self._state}
            return False
        return ok

    def _reap(self) -> None:
        for study in self.studies():
            for trial_id in op.stale_trial_ids(study):
                reap(study, trial_id)

    @staticmethod
    def _guarded(what: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # the database may be down; the next round tries again
            # The driver's words: Optuna wraps them in a message about invalid data.
            log.warning("%s failed: %s", what, root_cause(e))
            return False
