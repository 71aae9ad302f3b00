"""Trial overhead: time a persistent `hpo worker` spends per trial outside training, against one
fresh Python process per trial.

What it answers: of a 10-epoch trial on digits, how much wall time goes to anything but training
(asking, sampling, building the model, data, recording, checkpointing, the test evaluation), for
our persistent worker and for the common pattern of an Optuna loop that starts `python` per trial
(which imports torch and loads the data every time)?

    .venv/bin/python bench/trial_overhead.py                  # ~4 minutes on an idle 2-core box
    .venv/bin/python bench/trial_overhead.py --trials 24 --width 1.0 --storage postgresql://...

One run does, on the same storage (SQLite in a temporary folder unless --storage):

- **ours**: `hpo create` of a one-stage pipeline (lr, momentum, warmup_epochs searched; TPE with
  the same settings as a real stage; the median pruner consulted every epoch but kept from
  pruning by warmup_epochs = epochs, so every trial trains all its epochs), then --workers real
  `hpo worker` processes (`--threads 1`) until --trials trials are done.
- **baseline**: `study.optimize(objective, n_jobs=--workers)` with the same sampler, pruner and
  search space, where `objective` writes the trial's config and runs one fresh process per trial:
  `python -m trainer --config cfg.json --json`, the same `trainer.train` on the same config with
  the same per-epoch checkpoints, then reports its epochs and returns its best accuracy.

Both kinds of process run under a thin timing shim (this file with `--role worker|child`, which
wraps a few functions with a wall-clock timer and then hands over to `search.cli.main` or
`trainer.__main__.main` unchanged). How time is counted:

- **training** = the trainer's own `epoch_seconds` (the steps of every epoch) plus the per-epoch
  evaluation on the validation split (timed by the shim). Evaluation counts as training because
  the pruner needs it, and both sides do the same amount.
- **overhead** = everything else: for ours, the whole worker process's wall time minus training,
  divided by the trials ("amortized": start-up, imports and the one data load included), and the
  steady state, from the trial records: the time between one trial's completion and the next's
  minus the next one's training (ask, sampling, model, data cache hit, per-epoch database writes,
  checkpoints, test evaluation, artifact, tell, bookkeeping). For the baseline, the wall time of
  `study.optimize` minus training, divided by the trials (each trial pays everything).
- **share** = overhead / (training + overhead) of a mean trial.

The machine is usually shared: the script prints the load average beside its figures and never
asserts a timing. Training time is subtracted trial by trial, so load mostly scales the overhead
figures rather than biasing one side; run it twice and compare before trusting a small ratio.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import child_env  # bench/, the script's folder, is on the path

ROOT = Path(__file__).resolve().parents[1]
STAGE = "trials"  # the one stage of the overhead pipeline
STUDY = "overhead"
BASELINE_STUDY = "overhead-baseline"
SEARCHED = ("lr", "momentum", "warmup_epochs")  # same ranges as spaces/digits-quick.toml
GOAL_SHARE = 0.05  # the goal: overhead under 5% of a 10-epoch digits trial
USER_ATTRS = "user attrs (epochs, config, ...)"


# --------------------------------------------------------------------------------------------
# The timing shim, installed in the worker and child processes before they start.


class CallTimer:
    """Wall time of calls to chosen functions. Only outermost wrapped calls are recorded, so the
    labels never double count; the worker's heartbeat thread is left out (it runs beside the
    trial, not in it)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []  # (label, start in epoch s, seconds)
        self._local = threading.local()

    def wrap(
        self, owner: Any, name: str, label: str | Callable[[tuple, dict], str]
    ) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            if depth or threading.current_thread().name == "hpo-beat":
                return original(*args, **kwargs)
            self._local.depth = 1
            wall, start = time.time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = 0
                text = label if isinstance(label, str) else label(args, kwargs)
                self.events.append((text, wall, time.perf_counter() - start))

        setattr(owner, name, timed)


def _eval_label(args: tuple, kwargs: dict) -> str:
    split = kwargs.get("split", args[2] if len(args) > 2 else "?")
    return "evaluate val" if split == "val" else f"evaluate {split}"


def install_trainer_timers(timer: CallTimer) -> None:
    import trainer.checkpoint
    import trainer.train

    timer.wrap(trainer.train, "evaluate", _eval_label)
    timer.wrap(trainer.train, "load_data", "data (load or cache)")
    timer.wrap(trainer.train, "build_model", "build model")
    timer.wrap(trainer.train, "make_optimizer", "optimizer")
    timer.wrap(trainer.checkpoint, "save", "checkpoint writes")
    timer.wrap(trainer.checkpoint, "load", "checkpoint read (best.pt)")


def install_search_timers(timer: CallTimer) -> None:
    import optuna

    import search.db.pipeline
    import search.db.registry
    import search.db.writes
    import search.runtime.beat
    import search.runtime.objective
    import search.runtime.stages

    timer.wrap(optuna.study.Study, "ask", "ask (incl. TPE)")
    # The worker's ask, which calls Study.ask only at times.
    if hasattr(search.runtime.stages, "ask"):
        timer.wrap(search.runtime.stages, "ask", "ask (incl. TPE)")
    timer.wrap(optuna.study.Study, "tell", "tell")
    timer.wrap(optuna.trial.Trial, "report", "per-epoch report")
    timer.wrap(optuna.trial.Trial, "should_prune", "per-epoch should_prune")
    timer.wrap(optuna.trial.Trial, "set_user_attr", USER_ATTRS)
    # Where the worker writes several attributes in one transaction, it calls this instead.
    for module in (search.db.writes, search.runtime.stages):
        if hasattr(module, "set_user_attrs"):
            timer.wrap(module, "set_user_attrs", USER_ATTRS)
    timer.wrap(search.runtime.objective, "trial_config", "sample params + config")
    timer.wrap(search.runtime.objective, "upload_artifact", "artifact upload")
    timer.wrap(search.db.pipeline, "counts", "count trials")
    timer.wrap(search.db.registry, "touch_worker", "worker registry")
    timer.wrap(search.runtime.beat.Beat, "watch", "heartbeat at start")


def dump_timings(path: str, timer: CallTimer, marks: dict[str, float]) -> None:
    Path(path).write_text(json.dumps({"pid": os.getpid(), "events": timer.events, "marks": marks}))


def role_worker(timings: str, argv: list[str]) -> int:
    """`hpo worker ARGV` with the shim."""
    marks = {"entry": time.time()}
    timer = CallTimer()
    from search import cli

    # Imports torch now, where the worker may defer it to its first trial: the same total, and
    # the amortized figure counts both.
    install_trainer_timers(timer)
    install_search_timers(timer)
    marks["imported"] = time.time()
    atexit.register(dump_timings, timings, timer, marks)
    return cli.main(["worker", *argv])


def role_child(timings: str, config: str) -> int:
    """`python -m trainer --config CONFIG --json` with the shim: one baseline trial."""
    marks = {"entry": time.time()}
    import torch

    # The child is what the baseline starts per trial; it pays its own imports like any script.
    torch.set_num_threads(1)
    from trainer.__main__ import main

    timer = CallTimer()
    install_trainer_timers(timer)
    marks["imported"] = time.time()
    code = main(["--config", config, "--json"])
    marks["done"] = time.time()
    dump_timings(timings, timer, marks)
    return code


# --------------------------------------------------------------------------------------------
# The two sides.


@dataclass
class Trial:
    number: int
    start: float  # epoch seconds
    complete: float
    train_seconds: float  # sum of epoch_seconds
    val_eval_seconds: float = 0.0
    events: dict[str, float] = field(default_factory=dict)  # label -> seconds, in this trial

    @property
    def training(self) -> float:
        return self.train_seconds + self.val_eval_seconds


@dataclass
class Side:
    name: str
    wall: float  # process-seconds: sum over worker processes, or optimize() x n_jobs
    trials: list[Trial]
    steady: list[float] = field(default_factory=list)  # ours: overhead of each trial from the 2nd
    gaps: list[float] = field(default_factory=list)  # ours: previous trial's tell -> next start
    steady_parts: dict[str, float] = field(default_factory=dict)  # label -> mean s per trial
    load: float = 0.0

    @property
    def training(self) -> float:
        return sum(t.training for t in self.trials)

    @property
    def amortized(self) -> float:
        return (self.wall - self.training) / len(self.trials)

    @property
    def mean_training(self) -> float:
        return self.training / len(self.trials)


def space_text(args: argparse.Namespace) -> str:
    return textwrap.dedent(f"""\
        # Written by bench/trial_overhead.py: one stage, pruning consulted but never firing.
        dataset = "digits"
        [fixed]
        model = "{args.model}"
        width = {args.width}
        batch_size = {args.batch_size}
        crop_pad = 1
        hflip = false
        [[stage]]
        name = "{STAGE}"
        trials = {args.trials}
        epochs = {args.epochs}
        pruner = {{ startup_trials = 4, warmup_epochs = {args.epochs} }}
        sampler = {{ startup_trials = 4 }}
        [stage.params]
        lr = {{ low = 0.05, high = 0.5, log = true }}
        momentum = {{ low = 0.8, high = 0.95 }}
        warmup_epochs = {{ low = 0.0, high = 2.0 }}
        """)


def run_ours(args: argparse.Namespace, work: Path, url: str) -> Side:
    import optuna

    space = work / "overhead.toml"
    space.write_text(space_text(args))
    subprocess.run(
        [sys.executable, "-m", "search.cli", "create", "--space", str(space), "--study", STUDY,
         "--storage", url], check=True, env=child_env(), capture_output=True, text=True,
    )
    load = os.getloadavg()[0]
    procs: list[tuple[subprocess.Popen, float, Path]] = []
    for k in range(args.workers):
        timings = work / f"worker-{k}.json"
        log = (work / f"worker-{k}.log").open("w")
        started = time.time()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--role", "worker", "--timings", str(timings),
             "--study", STUDY, "--storage", url, "--artifacts", str(work / "artifacts")],
            cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        procs.append((proc, started, timings))
    wall = 0.0
    for proc, started, _ in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a worker exited {proc.returncode}; see {work}/worker-*.log")
        wall += time.time() - started
    shims = [json.loads(t.read_text()) for _, _, t in procs]

    study = optuna.load_study(study_name=f"{STUDY}/{STAGE}", storage=url)
    by_worker: dict[int, list[Trial]] = defaultdict(list)
    for frozen in study.get_trials(deepcopy=False):
        if frozen.state != optuna.trial.TrialState.COMPLETE:
            raise SystemExit(f"trial {frozen.number} ended {frozen.state.name}; see {work}")
        pid = int(frozen.user_attrs["worker"].split("#")[0].rsplit(":", 1)[1])
        by_worker[pid].append(record_trial(frozen))
    side = Side("ours", wall, [t for ts in by_worker.values() for t in ts], load=load)
    parts: dict[str, list[float]] = defaultdict(list)
    for shim in shims:
        trials = sorted(by_worker[shim["pid"]], key=lambda t: t.complete)
        attribute(trials, shim["events"], first_from=shim["marks"]["entry"])
        for prev, trial in itertools.pairwise(trials):
            side.steady.append(trial.complete - prev.complete - trial.training)
            side.gaps.append(trial.start - prev.complete)
            for label, seconds in trial.events.items():
                parts[label].append(seconds)
    side.steady_parts = {k: sum(v) / len(side.steady) for k, v in parts.items()}
    return side


def record_trial(frozen: Any) -> Trial:
    epochs = frozen.user_attrs.get("epochs", [])
    return Trial(
        number=frozen.number, start=frozen.datetime_start.timestamp(),
        complete=frozen.datetime_complete.timestamp(),
        train_seconds=sum(e["epoch_seconds"] for e in epochs),
    )


def attribute(trials: list[Trial], events: list[list], *, first_from: float) -> None:
    """Give each trial the shim's events between the previous trial's completion and its own: the
    bookkeeping before a trial (counting, asking) is part of what that trial costs."""
    bounds = [first_from] + [t.complete for t in trials]
    for trial, low, high in zip(trials, bounds, bounds[1:], strict=False):
        for label, start, seconds in events:
            if low <= start < high:
                trial.events[label] = trial.events.get(label, 0.0) + seconds
        trial.val_eval_seconds = trial.events.pop("evaluate val", 0.0)


def run_baseline(args: argparse.Namespace, work: Path, url: str) -> Side:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # `group=True` is experimental in Optuna; the worker uses it knowingly, and so do we.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    folder = work / "baseline"
    folder.mkdir()
    results: list[Trial] = []
    lock = threading.Lock()

    def objective(trial: optuna.Trial) -> float:
        cfg = {
            "dataset": "digits", "model": args.model, "width": args.width,
            "batch_size": args.batch_size, "crop_pad": 1, "hflip": False, "epochs": args.epochs,
            "lr": trial.suggest_float("lr", 0.05, 0.5, log=True),
            "momentum": trial.suggest_float("momentum", 0.8, 0.95),
            "warmup_epochs": trial.suggest_float("warmup_epochs", 0.0, 2.0),
            "device": "cpu", "checkpoint_dir": str(folder / f"trial-{trial.number:05d}"),
        }
        config = folder / f"trial-{trial.number:05d}.json"
        config.write_text(json.dumps(cfg))
        timings = folder / f"trial-{trial.number:05d}.timings.json"
        spawned = time.time()
        out = subprocess.run(
            [sys.executable, __file__, "--role", "child", "--timings", str(timings),
             "--config", str(config)],
            cwd=ROOT, env=child_env(), capture_output=True, text=True,
        )
        exited = time.time()
        if out.returncode != 0:
            raise RuntimeError(f"baseline trial {trial.number} failed:\n{out.stderr[-2000:]}")
        metrics = json.loads(out.stdout.strip().splitlines()[-1])
        for epoch in metrics["history"]:
            trial.report(epoch["val_acc"], epoch["epoch"])
        trial.set_user_attr("epochs", metrics["history"])
        shim = json.loads(timings.read_text())
        record = Trial(trial.number, spawned, exited,
                       sum(e["epoch_seconds"] for e in metrics["history"]))
        attribute([record], shim["events"], first_from=spawned)
        marks = shim["marks"]
        record.events["python start-up"] = marks["entry"] - spawned
        record.events["imports (torch, trainer)"] = marks["imported"] - marks["entry"]
        record.events["process exit"] = exited - marks["done"]
        with lock:
            results.append(record)
        return float(metrics["val_acc"])

    study = optuna.create_study(
        study_name=BASELINE_STUDY, storage=url, direction="maximize",
        sampler=optuna.samplers.TPESampler(n_startup_trials=4, multivariate=True, group=True,
                                           constant_liar=True, seed=0),
    )
    load = os.getloadavg()[0]
    started = time.time()
    study.optimize(objective, n_trials=args.trials, n_jobs=args.workers)
    wall = (time.time() - started) * args.workers
    side = Side("baseline", wall, results, load=load)
    parts: dict[str, list[float]] = defaultdict(list)
    for t in side.trials:
        for label, seconds in t.events.items():
            parts[label].append(seconds)
    side.steady_parts = {k: sum(v) / len(side.trials) for k, v in parts.items()}
    return side


# --------------------------------------------------------------------------------------------
# Report.


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}" if values else "-"
    return f"{statistics.median(values):.3f} (IQR {_q(values, 0.25):.3f}-{_q(values, 0.75):.3f})"


def _q(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=4, method="inclusive")[int(q * 4) - 1]


def print_parts(side: Side, overhead: float, residual_label: str) -> None:
    named = sum(side.steady_parts.values())
    rows = sorted(side.steady_parts.items(), key=lambda kv: -kv[1])
    rows.append((residual_label, overhead - named))
    for label, seconds in rows:
        print(f"    {label:<34} {seconds:7.3f} s  {seconds / overhead:6.1%}")


def report(args: argparse.Namespace, ours: Side, base: Side | None, url: str) -> None:
    import optuna
    import torch

    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\ntrial overhead, {today}: {args.trials} trials of {args.model} width {args.width},"
          f" {args.epochs} epochs, batch {args.batch_size}, digits; {args.workers} worker(s)"
          f" x 1 thread; optuna {optuna.__version__}, torch {torch.__version__}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores;"
          f" storage {url.split(':', 1)[0]}")
    print(f"load average (1 min) at start of ours {ours.load:.2f}"
          + (f", of baseline {base.load:.2f}" if base else "")
          + f", at end {os.getloadavg()[0]:.2f}")
    trial_time = ours.mean_training
    steady = statistics.mean(ours.steady) if ours.steady else float("nan")
    print(f"\ntraining per trial (epochs + per-epoch val evaluation): ours {trial_time:.2f} s"
          + (f", baseline {base.mean_training:.2f} s" if base else ""))
    print(f"  of which val evaluation: ours"
          f" {statistics.mean(t.val_eval_seconds for t in ours.trials):.3f} s"
          + (f", baseline {statistics.mean(t.val_eval_seconds for t in base.trials):.3f} s"
             if base else ""))
    print("\noverhead per trial (wall s outside training)     s/trial   share of trial")
    rows = [
        ("ours, steady state (trial 2 on, mean)", steady),
        (f"ours, amortized over {args.trials} trials (whole process)", ours.amortized),
    ]
    if base:
        rows.append(("baseline, fresh process per trial", base.amortized))
    for label, value in rows:
        mean_training = base.mean_training if label.startswith("baseline") and base else trial_time
        print(f"  {label:<48} {value:7.3f}   {value / (mean_training + value):6.1%}")
    if ours.gaps:
        gap = statistics.mean(ours.gaps)
        print(f"  ours steady state, of which between trials (tell to the next trial's start):"
              f" {gap:.3f} s; inside the trial's record: {steady - gap:.3f} s")
    if ours.steady:
        half = len(ours.steady) // 2
        print(f"  ours steady state, median and IQR: {spread(ours.steady)};"
              f" first half {statistics.mean(ours.steady[:half] or [steady]):.3f} s,"
              f" second half {statistics.mean(ours.steady[half:]):.3f} s")
    if base:
        print(f"\nbaseline / ours: {base.amortized / steady:.1f}x (steady state),"
              f" {base.amortized / ours.amortized:.1f}x (amortized)")
    print("\nwhere ours goes, steady-state trial (mean s per trial; share of its overhead):")
    print_parts(ours, steady, "other (Python between the timed calls)")
    if base:
        print("where the baseline goes, per trial:")
        print_parts(base, base.amortized,
                    "other (optimize loop, ask/tell, spawn, JSON, Python between)")
    share = steady / (trial_time + steady)
    verdict = "meets" if share < GOAL_SHARE else "misses"
    print(f"\nsummary: ours {steady:.3f} s/trial steady ({share:.1%} of a {trial_time + steady:.1f}"
          f" s trial, {verdict} the {GOAL_SHARE:.0%} goal), {ours.amortized:.3f} s amortized over"
          f" {args.trials}"
          + (f"; baseline {base.amortized:.3f} s/trial"
             f" ({base.amortized / (base.mean_training + base.amortized):.1%}),"
             f" {base.amortized / steady:.1f}x ours" if base else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=12, help="trials per side (default 12)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per trial (default 10)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--width", type=float, default=0.5, help="channel multiplier (default 0.5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1,
                   help="persistent workers for ours, n_jobs for the baseline (default 1)")
    p.add_argument("--storage", help="database URL (default: SQLite in the work folder); the"
                   " database must be empty of studies named overhead*")
    p.add_argument("--workdir", type=Path, help="keep files here (default: a temporary folder)")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--role", choices=("worker", "child"), help=argparse.SUPPRESS)
    p.add_argument("--timings", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    # The worker role passes what it does not know on to `hpo worker`.
    args, rest = p.parse_known_args(argv)
    if rest and args.role != "worker":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.role == "worker":
        return role_worker(args.timings, [*rest, "--storage", args.storage, "--device", "cpu",
                                          "--threads", "1"])
    if args.role == "child":
        return role_child(args.timings, args.config)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="trial-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{work / 'overhead.db'}"
    try:
        print(f"ours: {args.workers} x `hpo worker`, {args.trials} trials ...", flush=True)
        ours = run_ours(args, work, url)
        base = None
        if not args.skip_baseline:
            print(f"baseline: {args.trials} fresh processes ...", flush=True)
            base = run_baseline(args, work, url)
        report(args, ours, base, url)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
