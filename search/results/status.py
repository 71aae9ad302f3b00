"""`hpo status`: a table per stage and per worker, as text or JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import optuna

from search.db import winner
from search.results import progress, snapshot
from search.results.best import StageStatus, stage_status
from search.space.spec import Pipeline


def status_dict(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline,
    statuses: list[StageStatus] | None = None,
) -> dict[str, Any]:
    stages = []
    snap = snapshot.read(storage, name, pipe)
    statuses = statuses if statuses is not None else stage_status(storage, name, pipe)
    saved = progress.savings(snap, pipe)
    for s, view, spent in zip(statuses, snap.stages, saved, strict=True):
        c = s.counts
        stages.append({
            # Epochs trained, and what a search of this budget without pruning or deduplication
            # would have trained (search/results/progress.py).
            "epochs_trained": spent.trained, "epochs_without": spent.without,
            # Why trials did not complete, and hand-backs apart from failures
            # (search/results/snapshot.py).
            "outcomes": dict(view.reasons), "handed_back": view.handed_back,
            "epochs_saved": view.epochs_saved, "why": snapshot.reasons_line(view),
            # Complete trials that early stopping ended, and the epochs they did not train.
            "early_stopped": view.early_stopped,
            "epochs_early_stopped": view.epochs_early_stopped,
            # Trials queued from the stage's `start` list.
            "started": view.started,
            "stage": s.name, "budget": s.budget, "complete": c.complete, "pruned": c.pruned,
            "failed": c.failed, "running": c.running, "waiting": c.waiting,
            "best_value": s.best_value, "best_trial": s.best_trial, "carried": s.carried,
            "seconds": round(s.seconds, 1), "closed": s.closed, "exhausted": s.exhausted,
            "not_beaten": s.not_beaten, "closed_early": s.closed_early,
        })
    confirmed = [{k: v for k, v in c.items() if k != "best"}
                 for c in winner.confirmation(storage, name, pipe)]
    return {
        "study": name, "metric": pipe.metric, "direction": pipe.direction, "stages": stages,
        # The confirmation stage's candidates, best mean first: the first is the winner.
        "confirmed": confirmed,
        # Best value so far against cumulative epochs trained, per stage and for the pipeline.
        "time_to_accuracy": {c.name: {"epochs": c.epochs, "best": c.best}
                             for c in progress.curves(snap, pipe)},
        "workers": [
            {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in w.items()
             if k != "trial"} | _current(w) for w in snap.workers
        ],
    }


TRIAL_REF = re.compile(r"^[\w-]+#\d+$")  # "<stage>#<trial number>", as the worker notes it


def _current(w: dict[str, Any]) -> dict[str, Any]:
    """The worker's trial and epoch as its trial records them: fresher than its row, which its
    heartbeat refreshes every few seconds."""
    t = w.get("trial")
    if t is not None:
        return {"current": f"{t.stage}#{t.number}", "epoch": t.epoch}
    # A trial named in the row has ended since; anything else is the worker's own word (waiting
    # for a slot, why it stopped).
    return {"current": ""} if TRIAL_REF.match(w["current"] or "") else {}


def print_status(storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline) -> None:
    statuses = stage_status(storage, name, pipe)
    info = status_dict(storage, name, pipe, statuses)
    print(f"study {name!r}: {pipe.metric} ({pipe.direction})")
    header = ("stage", "budget", "complete", "pruned", "failed", "running", "best", "time")
    rows = [header]
    for s in info["stages"]:
        best = "-" if s["best_value"] is None else f"{s['best_value']:.4f} (#{s['best_trial']})"
        rows.append((s["stage"], str(s["budget"]), str(s["complete"]), str(s["pruned"]),
                     str(s["failed"] - s["handed_back"]), str(s["running"] + s["waiting"]), best,
                     _duration(s["seconds"])))
    table(rows)
    trained = sum(s["epochs_trained"] for s in info["stages"])
    without = sum(s["epochs_without"] for s in info["stages"])
    print(f"  epochs: {trained} trained; {without} without pruning or deduplication"
          f" ({max(0, without - trained)} saved{_shares(info['stages'])})")
    whole = info["time_to_accuracy"]["pipeline"]
    if whole["best"]:
        curve = progress.Curve("pipeline", whole["epochs"], whole["best"])
        print(f"  time to accuracy: {progress.sparkline(curve)}"
              f"  {', '.join(progress.reached(curve))}")
    for c in info["confirmed"]:
        of = c["of"]
        print(f"  {'winner' if c is info['confirmed'][0] else 'then  '}: {of['stage']}"
              f" #{of['trial']} re-run with {c['seeds']} seeds: {pipe.metric} {c['mean']:.4f}"
              f" ± {c['std']:.4f}")
    for s, st, stage in zip(info["stages"], statuses, pipe.stages, strict=True):
        if s["carried"] and stage.confirms is None:
            print(f"  {s['stage']} carries: {json.dumps(s['carried'], sort_keys=True)}")
        if st.verdict:
            print(f"  {s['stage']} {st.verdict}")
        if s["why"]:
            print(f"  {s['stage']}: {s['why']}")
    workers = info["workers"]
    if workers:
        print()
        # `current`: the trial a running worker is on; for a stopped one, why it stopped.
        rows = [("worker", "host", "pid", "device", "state", "trials", "last seen",
                 "current / reason")]
        for w in workers:
            rows.append((str(w["id"]), w["host"], str(w["pid"]), w["device"], w["state"],
                         str(w["trials_done"]), f"{w['seconds_since_seen']:.0f}s ago",
                         (f"{w['current']} epoch {w['epoch']}" if "epoch" in w
                          else w["current"] or "-")))
        table(rows)


def _shares(stages: list[dict[str, Any]]) -> str:
    """'; pruning 300, early stopping 120 in 4 trials': the parts of the saving the pruner and
    early stopping made (the rest is deduplication and budgets left unspent), where non-zero."""
    pruned = sum(s["epochs_saved"] for s in stages)
    stopped = sum(s["epochs_early_stopped"] for s in stages)
    trials = sum(s["early_stopped"] for s in stages)
    parts = [f"pruning {pruned}"] if pruned else []
    if trials:
        parts.append(f"early stopping {stopped} in {trials} trial{'s' if trials > 1 else ''}")
    return f"; {', '.join(parts)}" if parts else ""


def table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
