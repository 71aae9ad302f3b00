"""One read of a pipeline's progress, for the live view, `hpo status` and the end-of-run summary:
per stage its budget and trials by outcome with the reasons (median pruner, out of memory,
divergence, error, a worker lost, a trial handed back), epochs saved by pruning and by early
stopping, the best trial, the running trials with their epoch, and an ETA from the durations of
the finished trials.

The running trials come from Optuna's tables, not from the workers' rows: a trial's reported
epochs are written as they happen, while a worker's row is refreshed only with its heartbeat.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.db import budget, pipeline, registry
from search.db.attrs import EARLY_STOPPED, RETRY_OF, START
from search.db.storage import GRACE_SECONDS
from search.space.spec import Pipeline, Stage

# What a finished trial's outcome is called, from its state and the worker's `fail_reason`.
PRUNED_REASONS = {"oom": "out of memory", "diverged": "diverged"}
FAILED_REASONS = {"error": "error", "interrupted": "handed back"}
HANDED_BACK = "handed back"
LOST = "worker lost"  # failed by a reaper: its worker stopped beating
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
ENQUEUED = "enqueued_by"  # trial user attr: who queued this configuration (`hpo enqueue`)


@dataclass(frozen=True)
class Running:
    stage: str
    number: int
    epoch: int  # epochs reported so far
    epochs: int  # the stage's epochs
    worker: str  # "host:pid#id", as the worker records it on the trial


@dataclass
class StageView:
    name: str
    budget: int
    epochs: int
    opened: bool
    pruner: str = "median"  # the stage's pruner type, which stops trials without a reason
    complete: int = 0
    pruned: int = 0
    failed: int = 0  # errors and lost workers; a hand-back is not a failure
    handed_back: int = 0
    running: int = 0
    waiting: int = 0
    best_value: float | None = None
    best_trial: int | None = None
    reasons: Counter[str] = field(default_factory=Counter)  # outcome -> trials
    pruned_why: Counter[str] = field(default_factory=Counter)  # of the pruned trials
    failed_why: Counter[str] = field(default_factory=Counter)  # of the failed ones
    errors: Counter[str] = field(default_factory=Counter)  # error message -> trials
    epochs_saved: int = 0  # epochs the pruned trials did not train
    early_stopped: int = 0  # complete trials that early stopping ended before their last epoch
    epochs_early_stopped: int = 0  # epochs those did not train
    durations: list[float] = field(default_factory=list)  # of complete and pruned trials
    retried_as: dict[int, int] = field(default_factory=dict)  # trial -> the retry queued for it
    handed_back_trials: list[int] = field(default_factory=list)
    enqueued: int = 0  # configurations queued by `hpo enqueue`
    started: int = 0  # configurations queued from the stage's `start` list
    done: bool = False  # closed by the budget rules (`search.db.budget`), and nothing left running

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def closed(self) -> bool:
        return self.done and self.running == 0 and self.waiting == 0


@dataclass
class Snapshot:
    study: str
    metric: str
    direction: str
    stages: list[StageView]
    running: list[Running]
    workers: list[dict[str, Any]]
    first_start: datetime | None  # the earliest trial start, for the elapsed time of a watch
    finished_keys: set[tuple[str, int]]  # (stage, number) of every complete or pruned trial
    trials: dict[tuple[str, int], FrozenTrial]

    @property
    def best(self) -> tuple[str, int, float] | None:
        """(stage, trial number, value) of the best complete trial over all stages."""
        sign = 1.0 if self.direction == "maximize" else -1.0
        found = [(s.name, s.best_trial, s.best_value) for s in self.stages
                 if s.best_value is not None and s.best_trial is not None]
        return max(found, key=lambda f: sign * f[2]) if found else None

    @property
    def live_workers(self) -> list[dict[str, Any]]:
        return [w for w in self.workers if is_live(w)]

    @property
    def done(self) -> bool:
        return all(s.closed for s in self.stages)

    def eta_seconds(self) -> float | None:
        """Seconds left at the pace of the finished trials, shared by the live workers; None
        before any trial finished. A running trial counts by the epochs it has left."""
        timed = [(d, s.epochs) for s in self.stages for d in s.durations]
        if not timed:
            return None
        # A stage with no finished trial yet runs at the pace of the others, per epoch.
        per_epoch = sum(d for d, _ in timed) / sum(e for _, e in timed)
        work = 0.0
        for s in self.stages:
            mean = sum(s.durations) / len(s.durations) if s.durations else per_epoch * s.epochs
            left = max(0, s.budget - s.finished - s.running)
            running = [r for r in self.running if r.stage == s.name]
            work += mean * left + sum(mean * (1 - r.epoch / max(1, r.epochs)) for r in running)
        return work / max(1, len(self.live_workers))


def is_live(worker: dict[str, Any]) -> bool:
    """A worker is live while its row says running and its beat is recent: a killed worker's row
    says running forever."""
    return worker["state"] == "running" and worker["seconds_since_seen"] <= GRACE_SECONDS


def outcome(trial: FrozenTrial, pruner: str = "median") -> str:
    """What happened to a trial, in words; `pruner` names the stage's pruner (a trial pruned
    without a reason of the worker's was stopped by it)."""
    reason = str(trial.user_attrs.get("fail_reason") or "")
    if trial.state == TrialState.COMPLETE:
        return "complete"
    if trial.state == TrialState.PRUNED:
        return PRUNED_REASONS.get(reason, reason or f"{pruner.replace('_', ' ')} pruner")
    if trial.state == TrialState.FAIL:
        # No reason: a reaper failed it (its worker stopped beating); others say theirs
        # ("duplicate", "no data", ...).
        return FAILED_REASONS.get(reason, reason or LOST)
    return trial.state.name.lower()


def read(storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline) -> Snapshot:
    stages, running, starts = [], [], []
    finished: set[tuple[str, int]] = set()
    by_key: dict[tuple[str, int], FrozenTrial] = {}
    for stage in pipe.stages:
        study = pipeline.load_stage_study(storage, name, stage)
        counts, limit = pipeline.stage_state(study)
        view = StageView(
            name=stage.name, budget=stage.trials if limit.trials is None else limit.trials,
            epochs=stage.epochs, done=budget.closed(counts, limit), pruner=stage.pruner.type,
            opened=registry.get_stage(storage.engine, name, stage.name) is not None,
        )
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            by_key[(stage.name, t.number)] = t
            _count(view, t, stage, pipe.direction)
            if t.datetime_start is not None:
                starts.append(t.datetime_start)
            if t.state in FINISHED:
                finished.add((stage.name, t.number))
            if t.state == TrialState.RUNNING:
                running.append(Running(
                    stage=stage.name, number=t.number, epoch=max(t.intermediate_values, default=0),
                    epochs=stage.epochs, worker=str(t.user_attrs.get("worker", "")),
                ))
            if RETRY_OF in t.user_attrs:
                view.retried_as[int(t.user_attrs[RETRY_OF])] = t.number
        best = pipeline.best_trial(trials, pipe.direction, pipe.ties, pipe.metric)
        if best is not None:  # of equal values, the one the file's `ties` picks
            view.best_value, view.best_trial = best.value, best.number
        stages.append(view)
    workers = registry.list_workers(storage.engine, name)
    for w in workers:
        mine = f"#{w['id']}"
        w["trial"] = next((r for r in running if r.worker.endswith(mine)), None)
        # Counted from the trials: the worker's row is refreshed only with its heartbeat.
        w["trials_done"] = max(w["trials_done"], sum(
            1 for t in by_key.values()
            if t.state.is_finished() and str(t.user_attrs.get("worker", "")).endswith(mine)))
    return Snapshot(
        study=name, metric=pipe.metric, direction=pipe.direction, stages=stages, running=running,
        workers=workers, first_start=min(starts, default=None), finished_keys=finished,
        trials=by_key,
    )


def _count(view: StageView, t: FrozenTrial, stage: Stage, direction: str) -> None:
    kind, epochs = outcome(t, stage.pruner.type), stage.epochs
    if t.user_attrs.get(ENQUEUED):
        view.enqueued += 1
    if START in t.user_attrs:
        view.started += 1
    if t.state == TrialState.RUNNING:
        view.running += 1
        return
    if t.state == TrialState.WAITING:
        view.waiting += 1
        return
    view.reasons[kind] += 1
    if t.state == TrialState.COMPLETE:
        view.complete += 1
        sign = 1.0 if direction == "maximize" else -1.0
        if t.value is not None and (view.best_value is None or sign * t.value > sign *
                                    view.best_value):
            view.best_value, view.best_trial = t.value, t.number
        stopped = t.user_attrs.get(EARLY_STOPPED)
        if stopped is not None:
            view.early_stopped += 1
            view.epochs_early_stopped += max(0, epochs - int(stopped))
    elif t.state == TrialState.PRUNED:
        view.pruned += 1
        view.pruned_why[kind] += 1
        view.epochs_saved += max(0, epochs - max(t.intermediate_values, default=0))
    elif kind == HANDED_BACK:
        view.handed_back += 1
        view.handed_back_trials.append(t.number)
    else:
        view.failed += 1
        view.failed_why[kind] += 1
        if kind == "error":
            view.errors[str(t.user_attrs.get("error", "?"))[:100]] += 1
    if t.state in FINISHED and t.duration is not None:
        view.durations.append(t.duration.total_seconds())


def reasons_line(s: StageView) -> str:
    """Why trials of a stage did not complete, or not all their epochs: 'early stopped 2 (5
    epochs saved); pruned 2 (median pruner 1, out of memory 1); failed 1 (error: ValueError:
    ...); handed back 1 (resumed as #7)'. Empty when all completed every epoch."""
    parts = []
    if s.early_stopped:
        n = s.epochs_early_stopped
        parts.append(f"early stopped {s.early_stopped} ({n} epoch{'' if n == 1 else 's'} saved)")
    if s.pruned:
        why = ", ".join(f"{k} {n}" for k, n in sorted(s.pruned_why.items()))
        parts.append(f"pruned {s.pruned} ({why}; {s.epochs_saved} epochs saved)")
    if s.failed:
        causes = [f"{k} {n}" for k, n in sorted(s.failed_why.items()) if k != "error"]
        causes += [f"error: {msg}" + (f" x{n}" if n > 1 else "") for msg, n in s.errors.items()]
        parts.append(f"failed {s.failed} ({'; '.join(causes)})")
    if s.handed_back:
        resumed = sorted(s.retried_as[n] for n in s.handed_back_trials if n in s.retried_as)
        note = f"resumed as {', '.join(f'#{n}' for n in resumed)}" if resumed else "not resumed"
        parts.append(f"handed back {s.handed_back} ({note})")
    if s.enqueued:
        parts.append(f"enqueued by a user {s.enqueued}")
    if s.started:
        parts.append(f"from the start list {s.started}")
    return "; ".join(parts)


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
