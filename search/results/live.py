"""The live view of a search, for `hpo run` and `hpo status STUDY --watch`.

On a terminal: a screen redrawn every second (rich) with one bar per stage (finished of budget,
running, waiting, best, outcomes), the best trial so far, elapsed time and ETA, and each worker
with its trial and epoch. Anywhere else (CI, `docker compose logs`, a pipe): plain lines without
escape codes, one per finished trial. Per-epoch lines stay in the workers' log file; `-v` shows
them too.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO

import optuna
from optuna.trial import TrialState
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from search.db.storage import is_connection_error, root_cause
from search.results import snapshot
from search.results.snapshot import Snapshot, StageView, duration
from search.space.spec import Pipeline

REFRESH_SECONDS = 1.0
BAR_WIDTH = 24


def is_terminal(stream: IO[str]) -> bool:
    return stream.isatty() and os.environ.get("TERM", "") != "dumb"


class _Tail:
    """New lines of a growing log file, from where it ended when we started."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.offset = path.stat().st_size if path is not None and path.exists() else 0

    def lines(self) -> list[str]:
        if self.path is None or not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a half-written last line waits for the next round
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


def follow(
    storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline, *,
    stop: Callable[[Snapshot], bool], log_path: Path | None = None, verbose: bool = False,
    stream: IO[str] | None = None, started: float | None = None,
) -> Snapshot | None:
    """Show the search until `stop(snapshot)` is true; returns the last snapshot (None if the
    database never answered)."""
    out = stream or sys.stdout
    tail = _Tail(log_path if verbose else None)
    last: Snapshot | None = None
    seen: set[tuple[str, int]] | None = None
    note = ""

    def poll() -> Snapshot | None:
        nonlocal last, note
        try:
            last, note = snapshot.read(storage, name, pipe), ""
        except Exception as e:
            if not is_connection_error(e):
                raise
            note = f"database unreachable ({root_cause(e)}); showing the last state read"
        return last

    if is_terminal(out):
        console = Console(file=out, highlight=False)
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            while True:
                snap = poll()
                for line in tail.lines():
                    live.console.print(line, markup=False, highlight=False)
                if snap is not None:
                    live.update(render(snap, _elapsed(snap, started), log_path, note))
                if snap is not None and stop(snap):
                    return snap
                time.sleep(REFRESH_SECONDS)
    while True:
        snap = poll()
        for line in tail.lines():
            print(line, file=out, flush=True)
        if note:
            print(note, file=out, flush=True)
        if snap is not None:
            ended = _ended(snap)
            for key in sorted(ended - (seen if seen is not None else ended),
                              key=lambda k: snap.trials[k].datetime_complete or datetime.min):
                print(plain_line(snap, key, _elapsed(snap, started)), file=out, flush=True)
            seen = ended
            if stop(snap):
                return snap
        time.sleep(REFRESH_SECONDS)


def _ended(snap: Snapshot) -> set[tuple[str, int]]:
    return {k for k, t in snap.trials.items() if t.state.is_finished()}


def _elapsed(snap: Snapshot, started: float | None) -> float:
    """Since `started` (monotonic: `hpo run`), else since the first trial began (a watch)."""
    if started is not None:
        return time.monotonic() - started
    return (datetime.now() - snap.first_start).total_seconds() if snap.first_start else 0.0


def plain_line(snap: Snapshot, key: tuple[str, int], elapsed: float) -> str:
    """One finished trial: what happened to it, where its stage stands, the best so far."""
    stage_name, number = key
    t = snap.trials[key]
    stage = next(s for s in snap.stages if s.name == stage_name)
    epoch = max(t.intermediate_values, default=0)
    what = _what(snapshot.outcome(t, stage.pruner), t.state == TrialState.PRUNED, t.value,
                 snap.metric, f"epoch {epoch}/{stage.epochs}")
    took = f" in {t.duration.total_seconds():.0f}s" if t.duration else ""
    best = snap.best
    best_text = f"best {best[2]:.4f} ({best[0]} #{best[1]})" if best else "no best yet"
    return (f"[{duration(elapsed)}] {stage_name} #{number}: {what}{took} | stage"
            f" {stage.finished}/{stage.budget} | {best_text} | ETA {_eta(snap)}")


def _what(kind: str, pruned: bool, value: float | None, metric: str, at: str) -> str:
    if kind == "complete":
        return f"complete, {metric} {value:.4f}" if value is not None else "complete"
    if kind == snapshot.HANDED_BACK:
        return f"handed back at {at}"
    return f"{'pruned' if pruned else 'failed'} ({kind}) at {at}"


def _eta(snap: Snapshot) -> str:
    if snap.done:
        return "done"
    eta = snap.eta_seconds()
    return "after the first trial" if eta is None else duration(eta)


def render(snap: Snapshot, elapsed: float, log_path: Path | None, note: str = "") -> RenderableType:
    head = Text()
    head.append(f"{snap.study}", style="bold")
    head.append(f"  {snap.metric} ({snap.direction})  elapsed {duration(elapsed)}"
                f"  ETA {_eta(snap)}")
    stages = Table.grid(padding=(0, 1))
    for s in snap.stages:
        stages.add_row(
            Text(s.name, style="bold" if s.running else ""),
            ProgressBar(total=max(1, s.budget), completed=min(s.finished, s.budget),
                        width=BAR_WIDTH, complete_style="green" if s.closed else "cyan"),
            f"{s.finished}/{s.budget}", f"running {s.running}", f"waiting {s.waiting}",
            _best_text(s), _outcomes(s),
        )
    best = snap.best
    parts: list[RenderableType] = [head, stages]
    parts.append(Text(f"best so far: {best[2]:.4f} ({best[0]} #{best[1]})" if best
                      else "best so far: none complete yet", style="bold green" if best else ""))
    workers = Table.grid(padding=(0, 2))
    for w in snap.workers:
        trial = w.get("trial")
        # The epoch in training, one past those reported.
        doing = (f"{trial.stage} #{trial.number} epoch {min(trial.epoch + 1, trial.epochs)}"
                 f"/{trial.epochs}" if trial
                 else ("idle" if snapshot.is_live(w) else w["state"]))
        n = w["trials_done"]
        workers.add_row(f"worker {w['id']}", w["device"], doing,
                        f"{n} trial{'' if n == 1 else 's'} done")
    if snap.workers:
        parts.append(workers)
    if note:
        parts.append(Text(note, style="yellow"))
    if log_path is not None:
        parts.append(Text(f"log: {log_path}  (Ctrl-C hands the running trials back)",
                          style="dim"))
    return Group(*parts)


def _best_text(s: StageView) -> str:
    return "best -" if s.best_value is None else f"best {s.best_value:.4f} #{s.best_trial}"


def _outcomes(s: StageView) -> str:
    """'complete 5 (2 early stopped), median pruner 2, error 1; 6 epochs saved'."""
    counts = ", ".join(
        f"{k} {n}" + (f" ({s.early_stopped} early stopped)" if k == "complete" and
                      s.early_stopped else "")
        for k, n in sorted(s.reasons.items(), key=lambda kv: kv[0] != "complete"))
    epochs = s.epochs_saved + s.epochs_early_stopped
    saved = f"; {epochs} epoch{'s' if epochs > 1 else ''} saved" if epochs else ""
    return counts + saved


def stop_when_done(snap: Snapshot) -> bool:
    """For a watch: the search is over when every stage spent its budget and nothing runs."""
    return snap.done

