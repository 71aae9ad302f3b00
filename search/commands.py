"""Handlers of the `hpo` commands a person runs at the terminal: `run` with its live view and
closing summary, `status --watch`, `list`, `best`, `delete`, `extend` and `enqueue`.
search/cli.py holds their flags; the work is in search/results/live.py, search/manage.py and
search/results/summary.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import optuna

from search import manage
from search.artifacts import Artifacts, open_artifacts
from search.db import pipeline
from search.db.storage import open_storage, resolve_url
from search.results import live, snapshot
from search.results.best import best as best_info
from search.results.snapshot import Snapshot
from search.results.status import table
from search.results.summary import best_lines, run_summary
from search.space.spec import Pipeline

LOG_NAME = "run.log"  # per study, under the artifacts folder: `hpo delete` removes it with them


def run(args: argparse.Namespace, url: str, name: str, store: Artifacts) -> int:
    """`hpo run` after the study was created: workers, the live view, then the summary."""
    from search.runtime.local import run_local

    storage = open_storage(url)
    pipe = pipeline.load(storage, name)
    artifacts = store.url or store.root
    log_path = store.root / name / LOG_NAME  # a bucket's local cache: the log stays on this host
    print(f"{name}: {args.workers} worker(s); per-epoch log in {log_path}", flush=True)
    started = time.monotonic()

    def monitor(alive: Callable[[], bool]) -> None:
        live.follow(storage, name, pipe, stop=lambda _s: not alive(),
                    log_path=log_path, verbose=args.verbose,
                    started=started)

    code = run_local(url, name, workers=args.workers, device=args.device, artifacts=artifacts,
                     threads=args.threads, fault=args.fault, log=log_path, monitor=monitor)
    snap = snapshot.read(storage, name, pipe)
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-8:] if log_path.exists() else []
        print("\n".join(["workers failed; the end of their log:", *tail]), file=sys.stderr)
    print("\n".join(_summary(storage, name, pipe, snap, time.monotonic() - started, code,
                             log_path)))
    return code


def _summary(storage: optuna.storages.RDBStorage, name: str, pipe: Pipeline, snap: Snapshot,
             elapsed: float, code: int, log_path: Path | None) -> list[str]:
    try:
        info = best_info(storage, name, pipe)
    except pipeline.PipelineError:
        info = None
    return run_summary(snap, pipe, info, elapsed=elapsed, code=code, log_path=log_path,
                       study=name)


def watch(args: argparse.Namespace) -> int:
    storage = open_storage(resolve_url(args.storage))
    pipe = pipeline.load(storage, args.study)
    snap = live.follow(storage, args.study, pipe, stop=live.stop_when_done)
    if snap is not None:
        print("\n".join(_summary(storage, args.study, pipe, snap, _since(snap), 0, None)))
    return 0


def _since(snap: Snapshot) -> float:
    return (datetime.now() - snap.first_start).total_seconds() if snap.first_start else 0.0


def list_studies(args: argparse.Namespace) -> int:

    rows = manage.list_rows(open_storage(resolve_url(args.storage)))
    if not rows:
        print("no studies in this storage; create one with `hpo create --space FILE`")
        return 0
    table([("study", "state", "best", "last activity"), *rows])
    return 0


def best(args: argparse.Namespace) -> int:
    storage = open_storage(resolve_url(args.storage))
    pipe = pipeline.load(storage, args.study)
    lines = best_lines(best_info(storage, args.study, pipe), pipe, every_field=args.all)
    if not args.all:
        lines.append(f"  every field: hpo best {args.study} --all")
    print("\n".join(lines))
    return 0


def delete(args: argparse.Namespace) -> int:
    storage = open_storage(resolve_url(args.storage))
    store = open_artifacts(args.artifacts)
    plan = manage.plan_delete(storage, args.study, store, keep_objects=args.keep_objects)
    what = plan.what
    if not args.yes:
        if not sys.stdin.isatty():
            raise pipeline.PipelineError(f"not deleted: {what}; confirm with --yes (no terminal"
                                         " to ask on)")
        answer = input(f"delete {what}? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("not deleted")
            return 1
    manage.delete(storage, args.study, plan, store)
    print(f"deleted {what}")
    return 0


def extend(args: argparse.Namespace) -> int:
    print(manage.extend(open_storage(resolve_url(args.storage)), args.study, args.stage,
                        args.trials))
    return 0


def enqueue(args: argparse.Namespace) -> int:
    print(manage.enqueue(open_storage(resolve_url(args.storage)), args.study, args.stage,
                         args.params))
    return 0



def quiet_optuna() -> None:
    """Optuna's INFO lines ("A new study created ...") belong in the log, not on the screen."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
