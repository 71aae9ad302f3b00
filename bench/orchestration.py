"""Orchestration at scale: what the search service costs per trial when training costs nothing,
as the number of trials and of worker processes grows, against plain Optuna on the same database.

What it answers: with W worker processes on one PostgreSQL study and a trainer that reports its
epochs instantly, how many trials per second go through, how many milliseconds of orchestration
(asking, sampling, pruning, recording, heartbeats) a trial costs at the start of the study and at
its end, how many database connections the workers hold, and where the milliseconds go.

    .venv/bin/python bench/orchestration.py --quick       # 300 trials, 1/4/16 workers per side
    .venv/bin/python bench/orchestration.py --workers 1,4,16,64 --trials 2000 --epochs 10

For each W, each side gets a fresh database of its own (`bench_orch_<hex>`, dropped afterwards):

- **ours**: `hpo create` of a one-stage pipeline (4 parameters, TPE and median pruner start-up as
  given), then W real `hpo worker` processes whose `train` is the load tests' stub
  (tests/search/stub_worker.py: reports its epochs without sleeping, writes a tiny best.pt).
  Everything else is the production worker, with production heartbeat settings.
- **baseline**: W processes, each `study.optimize(objective, n_trials=...)` on an `RDBStorage(url)`
  with default settings (the same psycopg2 driver), the same `TPESampler` (multivariate, group,
  constant_liar, same start-up) and `MedianPruner`, and an objective that suggests the same 4
  parameters and reports the same values with `should_prune` each epoch.
- **before** (with --before DIR): ours from another source tree, e.g. the previous commit
  (`git archive HEAD | tar -x -C DIR`), to measure a change.

The sides run at the same time (--sequential: one after another), so that the background load of
a shared machine falls on all of them alike; they share the machine's cores. Every side runs until
all sides have --trials finished trials, then every worker gets SIGTERM; figures count the first
--trials trials of each side (a side that gets there first keeps the others company).

Every worker process runs under the same timing shim (this file with `--role`): it wraps Optuna's
and our functions with an exclusive wall-clock timer (a call's time goes to the innermost wrapped
call, so the categories add up), counts SQL statements and commits, and cuts the main thread's
time into trials at each `Study.ask`. A trial's cycle runs from its `ask` to the worker's next
`ask`, so it holds everything the worker does per trial; orchestration = cycle minus the trainer
(the stub's own time). Each worker's first trial (imports, first connections) and last (cut by the
stop) are left out. "first 10%" / "last 10%" are trials numbered in the first and last tenth of
--trials. Worker CPU is the worker process's CPU time (all threads) per cycle; DB CPU is the
PostgreSQL backends' CPU (from /proc) over the run per finished trial. Connections are sampled from
pg_stat_activity every 0.2 s.

On 2 cores, W > 2 workers wait for each other's CPU, so a trial's wall time grows with W while
its CPU does not: read CPU ms for cost and wall ms for what a trial waits. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import importlib
import inspect
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import child_env  # bench/, the script's folder, is on the path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is on the path and the packages are not. A worker of side "before" runs
# the packages of another source tree (--before), under this same shim.
sys.path.insert(0, os.environ.get("ORCH_ROOT", str(ROOT)))

from tests.helpers import admin, create_database, database_url, drop_database  # noqa: E402

STUDY = "orch"
STAGE = "load"
PARAMS = """\
lr = { low = 0.001, high = 1.0, log = true }
momentum = { low = 0.5, high = 0.99 }
weight_decay = { low = 1e-5, high = 1e-2, log = true }
label_smoothing = { low = 0.0, high = 0.2 }
"""
TRAINER = "trainer (stub)"
OTHER = "other (glue, logging, files)"
SAMPLE_SECONDS = 0.2  # pg_stat_activity sampling period


# --- the timing shim: runs inside every worker process -------------------------------------------


class Shim:
    """Exclusive wall-clock timing by category, cut into trials at each `Study.ask` of the main
    thread. Time in other threads (the heartbeat thread) is summed apart."""

    def __init__(self) -> None:
        self.main = threading.get_ident()
        self.local = threading.local()
        self.records: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.background: dict[str, float] = defaultdict(float)
        self.started = (time.perf_counter(), time.process_time())

    def _stack(self) -> list[list[Any]]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def add(self, key: str, value: float, *, table: str = "ms") -> None:
        if threading.get_ident() != self.main:
            self.background[f"{table}:{key}"] += value
        elif self.current is not None:
            bucket = self.current[table]
            bucket[key] = bucket.get(key, 0.0) + value

    def timed(self, fn: Callable[..., Any], category: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._stack()
            frame = [time.perf_counter(), 0.0, category]
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                elapsed = time.perf_counter() - frame[0]
                self.add(category, (elapsed - frame[1]) * 1e3)
                self.add(category, 1, table="calls")
                if stack:
                    stack[-1][1] += elapsed

        return timed

    def wrap(self, owner: Any, name: str, category: str) -> None:
        if name in vars(owner):  # only what the class itself defines: never wrap twice
            setattr(owner, name, self.timed(vars(owner)[name], category))

    def new_trial(self) -> None:
        self.close()
        self.current = {"t": time.perf_counter(), "cpu": time.process_time(), "ms": {},
                        "calls": {}, "sql": {}, "n": {}, "number": None}

    def close(self) -> None:
        if self.current is not None:
            self.current["wall_ms"] = (time.perf_counter() - self.current["t"]) * 1e3
            self.current["cpu_ms"] = (time.process_time() - self.current["cpu"]) * 1e3
            self.records.append(self.current)
            self.current = None

    def dump(self, path: str) -> None:
        self.close()
        wall, cpu = self.started
        Path(path).write_text(json.dumps({
            "pid": os.getpid(), "records": self.records, "background": self.background,
            "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "rss_mb": _rss_mb(),
        }))


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def install(shim: Shim) -> None:
    """Wrap what both kinds of worker call; names that do not exist (ours only, or a function
    optimised away) are skipped."""
    import optuna
    import sqlalchemy as sa
    from optuna.pruners import PercentilePruner
    from optuna.samplers import TPESampler
    from optuna.storages import RDBStorage
    from optuna.storages._cached_storage import _CachedStorage

    for name in ("before_trial", "after_trial", "infer_relative_search_space",
                 "sample_relative", "sample_independent"):
        shim.wrap(TPESampler, name, "sampler (TPE)")
    shim.wrap(PercentilePruner, "prune", "pruner")  # MedianPruner's prune
    shim.wrap(optuna.trial.Trial, "should_prune", "pruner")
    for name in ("get_all_trials", "get_trial"):
        shim.wrap(_CachedStorage, name, "trial cache (sort, filter, copy)")
    for name in ("_get_trials", "get_trial", "get_study_user_attrs", "get_study_id_from_name",
                 "get_study_directions", "get_study_name_from_id", "get_study_system_attrs",
                 "get_trial_id_from_study_id_trial_number"):
        shim.wrap(RDBStorage, name, "db reads (trials)")
    for name in ("_create_new_trial", "_set_trial_param", "set_trial_state_values",
                 "set_trial_intermediate_value", "set_trial_system_attr"):
        shim.wrap(RDBStorage, name, "db writes (trial, params, values)")
    shim.wrap(RDBStorage, "set_trial_user_attr", "db writes (user attrs)")
    shim.wrap(RDBStorage, "record_heartbeat", "heartbeat")
    shim.wrap(optuna.study.Study, "tell", "tell (checks)")
    shim.wrap(optuna.trial.Trial, "report", "report (checks)")

    optuna.study.Study.ask = cutting(shim, vars(optuna.study.Study)["ask"])  # type: ignore[method-assign]

    def statement(*_: Any) -> None:
        shim.add("statements", 1, table="n")
        stack = shim._stack()
        shim.add(stack[-1][2] if stack else OTHER, 1, table="sql")

    def commit(*_: Any) -> None:
        shim.add("commits", 1, table="n")

    def checkout(*_: Any) -> None:
        shim.add("checkouts", 1, table="n")

    sa.event.listen(sa.Engine, "before_cursor_execute", statement)
    sa.event.listen(sa.Engine, "commit", commit)
    sa.event.listen(sa.pool.Pool, "checkout", checkout)


def cutting(shim: Shim, ask: Callable[..., Any]) -> Callable[..., Any]:
    """`ask`, timed, starting a new trial record at each outermost call in the main thread."""
    timed = shim.timed(ask, "ask (checks)")

    def ask_and_cut(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == shim.main and not shim._stack():
            shim.new_trial()
        trial = timed(*args, **kwargs)
        if shim.current is not None and threading.get_ident() == shim.main:
            shim.current["number"] = trial.number
        return trial

    return ask_and_cut


def _module(*names: str) -> Any:
    """The first of `names` that imports: side "before" may run a tree of another layout."""
    for name in names:
        # ImportError too: a tree of the older layout lacks search.db, and this machine's
        # editable install may offer another tree's, which then fails to import here.
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    raise ModuleNotFoundError(names[0])


def install_ours(shim: Shim) -> Any:
    """Wrap the worker's calls; returns the stub trainer, timed, for the worker to run."""
    pipeline = _module("search.db.pipeline", "search.pipeline")
    registry = _module("search.db.registry", "search.registry")
    writes = _module("search.db.writes", "search.storage")
    stages = _module("search.runtime.stages", "search.worker")
    beat = _module("search.runtime.beat", "search.beat")
    objective = _module("search.runtime.objective", "search.objective")

    if hasattr(stages, "ask"):  # the worker's own ask, which calls Study.ask only at times
        stages.ask = cutting(shim, stages.ask)

    shim.wrap(pipeline, "counts", "budget count")
    shim.wrap(registry, "touch_worker", "worker registry")
    # Each holds its own reference to the function (the older layout: storage, objective, worker).
    for module in {writes, stages, objective}:
        shim.wrap(module, "set_user_attrs", "db writes (user attrs)")
    shim.wrap(beat.Beat, "_reap", "reaper")
    shim.wrap(objective, "upload_artifact", "artifact (file copy + attr)")
    shim.wrap(objective, "trial_config", "config (suggest + TrainConfig)")
    from tests.search.stub_worker import stub_train

    timed = shim.timed(stub_train, TRAINER)
    if not hasattr(objective, "Train"):  # a tree from before the trainer was passed in
        objective.train = timed
    return timed


def role_ours(timings: str, argv: list[str]) -> int:
    shim = Shim()
    install(shim)
    train = install_ours(shim)
    atexit.register(shim.dump, timings)
    from search import cli

    if "train" not in inspect.signature(cli.main).parameters:
        return int(cli.main(["worker", *argv]))
    return int(cli.main(["worker", *argv], train=train))


def role_baseline(timings: str, args: argparse.Namespace) -> int:
    """Plain Optuna: the script most people would write for W processes on one database."""
    shim = Shim()
    install(shim)
    atexit.register(shim.dump, timings)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=f"{STUDY}/{STAGE}", storage=optuna.storages.RDBStorage(args.url),
        sampler=optuna.samplers.TPESampler(
            n_startup_trials=args.sampler_startup, multivariate=True, group=True,
            constant_liar=True, seed=args.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=args.pruner_startup,
                                           n_warmup_steps=args.warmup),
    )
    epochs = args.epochs

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 0.001, 1.0, log=True)
        trial.suggest_float("momentum", 0.5, 0.99)
        trial.suggest_float("weight_decay", 1e-5, 1e-2, log=True)
        trial.suggest_float("label_smoothing", 0.0, 0.2)
        acc = math.exp(-(math.log10(lr) + 1.0) ** 2)  # the stub trainer's response surface
        for epoch in range(1, epochs + 1):
            trial.report(acc * epoch / epochs, epoch)
            if epoch < epochs and trial.should_prune():
                raise optuna.TrialPruned()
        return acc

    def stop(_signum: int, _frame: object) -> None:
        # Finish the running trial and leave the loop, so the shim writes its timings.
        with contextlib.suppress(RuntimeError):  # outside the loop: it ends by itself
            study.stop()

    signal.signal(signal.SIGTERM, stop)
    study.optimize(objective, n_trials=args.n_trials)
    return 0


# --- the driver -----------------------------------------------------------------------------------


@dataclass
class Phase:
    trials: int = 0
    wall_ms: float = math.nan
    cpu_ms: float = math.nan
    ms: dict[str, float] = field(default_factory=dict)
    n: dict[str, float] = field(default_factory=dict)
    sql: dict[str, float] = field(default_factory=dict)  # statements per trial, by category


@dataclass
class Run:
    variant: str
    workers: int
    finished: int = 0
    rows: int = 0
    failed: int = 0
    duplicates: int = 0
    wall_s: float = math.nan
    span_s: float = math.nan
    conn_peak: int = 0
    conn_mean: float = 0.0
    db_cpu_ms: float = math.nan
    rss_mb: float = math.nan
    beat_ms_per_s: float = 0.0
    phases: dict[str, Phase] = field(default_factory=dict)
    load: float = 0.0
    outages: int = 0  # samples at which the server was unreachable
    error: str = ""

    @property
    def per_second(self) -> float:
        return self.finished / self.span_s if self.span_s > 0 else math.nan


def connection_room() -> tuple[int, int]:
    """(max_connections, connections in use now): the server is shared with other test runs."""
    conn = admin()
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW max_connections")
            limit = int(cur.fetchone()[0])
            cur.execute("SELECT count(*) FROM pg_stat_activity"
                        " WHERE backend_type = 'client backend'")
            used = int(cur.fetchone()[0])
    finally:
        conn.close()
    return limit, used


def worker_env(url: str) -> dict[str, str]:
    # Production heartbeat settings: HPO_HEARTBEAT and HPO_GRACE are left unset.
    return child_env(HPO_STORAGE=url)


def backend_cpu_ms(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * 1e3 / os.sysconf("SC_CLK_TCK")


@dataclass
class Side:
    """One side of a run while it is under way."""

    run: Run
    db: str
    folder: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    conns: list[int] = field(default_factory=list)
    cpu: dict[int, float] = field(default_factory=dict)
    watcher: Any = None  # a connection to its database, for the finished count
    reached: float | None = None  # monotonic time it had --trials finished trials


def run_group(sides: list[str], workers: int, args: argparse.Namespace, work: Path) -> list[Run]:
    """Run `sides` at the same time, each with `workers` worker processes on a database of its own,
    until every side has --trials finished trials; then SIGTERM every worker. A side that gets
    there first keeps running (its extra trials are not counted), so the sides share the machine
    the whole time and background load falls on all of them alike."""
    group: list[Side] = []
    try:
        for variant in sides:
            db = create_database("bench_orch")
            folder = work / f"{variant}-{workers}"
            folder.mkdir()
            group.append(Side(Run(variant, workers, load=os.getloadavg()[0]), db, folder))
            _prepare(variant, workers, args, database_url(db), folder)
        for k in range(workers):  # interleaved, so no side gets a head start
            for side in group:
                side.procs.append(_start_worker(side.run.variant, k, workers, args,
                                                database_url(side.db), side.folder))
        started = time.monotonic()
        _watch(group, args, started)
        for side in group:
            side.run.wall_s = (side.reached or time.monotonic()) - started
            codes = [p.poll() for p in side.procs]
            if any(c != 0 for c in codes):
                bad = next(i for i, c in enumerate(codes) if c != 0)
                tail = (side.folder / f"w{bad}.log").read_text()[-1500:]
                side.run.error = f"worker {bad} exited {codes[bad]}: ...{tail}"
            side.run.conn_peak = max(side.conns, default=0)
            side.run.conn_mean = statistics.fmean(side.conns) if side.conns else 0.0
            _collect(side.run, database_url(side.db), side.folder, sum(side.cpu.values()),
                     args.trials)
    finally:
        for side in group:
            for p in side.procs:
                if p.poll() is None:
                    p.kill()
            if side.watcher is not None:
                with contextlib.suppress(Exception):
                    side.watcher.close()
            _drop(side.db)
    return [side.run for side in group]


def _drop(db: str) -> None:
    """Drop a run's database, retrying for a minute while the server restarts."""
    for attempt in range(30):
        try:
            drop_database(db)
            return
        except Exception:
            if attempt == 29:
                print(f"!! could not drop database {db}; drop it by hand", flush=True)
                return
            time.sleep(2.0)


def _prepare(variant: str, workers: int, args: argparse.Namespace, url: str,
             folder: Path) -> None:
    """The study: ours through `hpo create`, the baseline through `optuna.create_study`. Ours gets
    a budget well beyond --trials: the run is stopped from outside, as the baseline is."""
    if variant in ("ours", "before"):
        space = folder / "space.toml"
        space.write_text(textwrap.dedent(f"""\
            dataset = "digits"
            [[stage]]
            name = "{STAGE}"
            trials = {args.trials * 10}
            epochs = {args.epochs}
            sampler = {{ startup_trials = {args.sampler_startup} }}
            pruner = {{ startup_trials = {args.pruner_startup}, warmup_epochs = {args.warmup} }}
            [stage.params]
            """) + PARAMS)
        root = args.before.resolve() if variant == "before" else ROOT
        created = subprocess.run([sys.executable, "-m", "search.cli", "create", "--space",
                                  str(space), "--study", STUDY], cwd=root, env=worker_env(url),
                                 capture_output=True, text=True, timeout=300)
        if created.returncode != 0:
            raise RuntimeError(f"hpo create failed: {created.stderr[-2000:]}")
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(url)
    optuna.create_study(storage=storage, study_name=f"{STUDY}/{STAGE}", direction="maximize")
    storage.engine.dispose()


def _start_worker(variant: str, k: int, workers: int, args: argparse.Namespace, url: str,
                  folder: Path) -> subprocess.Popen:
    env = worker_env(url)
    root = ROOT
    timings = folder / f"w{k}.json"
    if variant == "baseline":
        cmd = [sys.executable, __file__, "--role", "baseline", "--timings", str(timings),
               "--url", url, "--n-trials", str(args.trials * 10), "--seed", str(k),
               "--epochs", str(args.epochs), "--sampler-startup", str(args.sampler_startup),
               "--pruner-startup", str(args.pruner_startup), "--warmup", str(args.warmup)]
    else:
        if variant == "before":
            root = args.before.resolve()
            env["ORCH_ROOT"] = str(root)
        cmd = [sys.executable, __file__, "--role", "ours", "--timings", str(timings), "--",
               "--study", STUDY, "--device", "cpu", "--threads", "1",
               "--artifacts", str(folder / "artifacts")]
    if args.profile and k == 0:
        cmd[1:1] = ["-m", "cProfile", "-o", str(folder / "w0.prof")]
    log = (folder / f"w{k}.log").open("w")
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


def _watch(group: list[Side], args: argparse.Namespace, started: float) -> None:
    """Sample each database's connections and its backends' CPU; stop every worker once every
    side has --trials finished trials (or a side's workers all exited, or time ran out). The
    server is shared: if it restarts meanwhile, reconnect and note it."""
    import psycopg2

    monitor = None
    stopping = None
    while any(p.poll() is None for side in group for p in side.procs):
        now = time.monotonic()
        if now - started > args.timeout and stopping is None:
            print(f"    timed out after {args.timeout:.0f}s", flush=True)
            stopping = now
            _stop(group)
        if stopping is not None and now - stopping > 120:
            for side in group:
                for p in side.procs:
                    p.kill()
            break
        try:
            if monitor is None:
                monitor = admin()
                for side in group:
                    side.watcher = admin(side.db)
            own = [side.watcher.get_backend_pid() for side in group]
            with monitor.cursor() as cur:
                for side in group:
                    cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND NOT"
                                " pid = ANY(%s)", (side.db, own))
                    pids = [row[0] for row in cur.fetchall()]
                    if stopping is None:
                        side.conns.append(len(pids))
                    for pid in pids:
                        ms = backend_cpu_ms(pid)
                        if ms is not None:
                            side.cpu[pid] = max(side.cpu.get(pid, 0.0), ms)
                    if side.reached is None:
                        with side.watcher.cursor() as count:
                            count.execute("SELECT count(*) FROM trials WHERE state IN"
                                          " ('COMPLETE', 'PRUNED')")
                            if count.fetchone()[0] >= args.trials:
                                side.reached = time.monotonic()
        except psycopg2.Error as e:
            print(f"    database unavailable ({str(e).strip().splitlines()[0]}): someone"
                  " restarted the server? reconnecting", flush=True)
            for side in group:
                side.run.outages += 1
            for c in [monitor] + [side.watcher for side in group]:
                with contextlib.suppress(Exception):
                    c.close()
            monitor = None
            time.sleep(1.0)
            continue
        for side in group:
            if side.reached is None and all(p.poll() is not None for p in side.procs):
                side.reached = time.monotonic()  # it will never get there
        if stopping is None and all(side.reached is not None for side in group):
            stopping = time.monotonic()
            _stop(group)
        time.sleep(SAMPLE_SECONDS)
    if monitor is not None:
        monitor.close()


def _stop(group: list[Side]) -> None:
    """SIGTERM: ours hands its running trial back and exits 0, the baseline stops its loop."""
    for side in group:
        for p in side.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)


def _collect(run: Run, url: str, folder: Path, db_cpu_ms: float, trials: int) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            rows = c.execute(sa.text(
                "SELECT number, state, datetime_start, datetime_complete FROM trials")).all()
    finally:
        engine.dispose()
    numbers = [r[0] for r in rows]
    run.rows = len(rows)
    run.duplicates = len(numbers) - len(set(numbers))
    finished = sorted(r[3] for r in rows if str(r[1]).endswith(("COMPLETE", "PRUNED")))
    run.finished = min(len(finished), trials)
    run.failed = sum(str(r[1]).endswith("FAIL") for r in rows if r[0] < trials)
    starts = [r[2] for r in rows if r[2] is not None]
    if starts and finished:
        run.span_s = (finished[run.finished - 1] - min(starts)).total_seconds()
    run.db_cpu_ms = db_cpu_ms / max(len(finished), 1)

    shims = [json.loads(p.read_text()) for p in sorted(folder.glob("w*.json"))]
    if not shims:
        return
    run.rss_mb = statistics.fmean(s["rss_mb"] for s in shims)
    beat_ms = sum(v for s in shims for k, v in s["background"].items() if k.startswith("ms:"))
    run.beat_ms_per_s = beat_ms / sum(s["wall_s"] for s in shims)
    records = []
    for s in shims:
        # A worker's first trial pays its one-off costs (lazy imports, first connections) and
        # its last one was cut short by the stop: neither is a steady-state trial.
        records.extend(r for r in s["records"][1:-1]
                       if r["number"] is not None and r["number"] < trials)
    if not records:
        return
    tenth = max(1, round(0.1 * trials))
    run.phases["first"] = _phase([r for r in records if r["number"] < tenth])
    run.phases["last"] = _phase([r for r in records if r["number"] >= trials - tenth])
    run.phases["all"] = _phase(records)


def _phase(records: list[dict[str, Any]]) -> Phase:
    if not records:
        return Phase()
    count = len(records)
    ms: dict[str, float] = defaultdict(float)
    n: dict[str, float] = defaultdict(float)
    sql: dict[str, float] = defaultdict(float)
    for r in records:
        for key, value in r["ms"].items():
            ms[key] += value / count
        for key, value in r["n"].items():
            n[key] += value / count
        for key, value in r.get("sql", {}).items():
            sql[key] += value / count
        ms[OTHER] += (r["wall_ms"] - sum(r["ms"].values())) / count
    return Phase(trials=count, wall_ms=statistics.fmean(r["wall_ms"] for r in records),
                 cpu_ms=statistics.fmean(r["cpu_ms"] for r in records), ms=dict(ms), n=dict(n),
                 sql=dict(sql))


# --- printing -------------------------------------------------------------------------------------


def orchestration_ms(phase: Phase | None) -> float:
    return phase.wall_ms - phase.ms.get(TRAINER, 0.0) if phase and phase.trials else math.nan


def print_summary(runs: list[Run]) -> None:
    print("\n| W | side | trials | trials/s | orch. ms/trial first 10% | last 10% | last/first"
          " | worker CPU ms/trial first / last | DB CPU ms/trial | SQL stmts / commits per trial"
          " | connections peak (mean) | RSS MB/worker |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        if r.error and not r.phases:
            print(f"| {r.workers} | {r.variant} | failed: {r.error.splitlines()[0][:80]} |")
            continue
        first, last, every = (r.phases.get(k) for k in ("first", "last", "all"))
        f_ms, l_ms = orchestration_ms(first), orchestration_ms(last)
        f_cpu, l_cpu = (p.cpu_ms if p else math.nan for p in (first, last))
        n = every.n if every else {}
        print(f"| {r.workers} | {r.variant} | {r.finished} | {r.per_second:.1f} | {f_ms:.1f} |"
              f" {l_ms:.1f} | {l_ms / f_ms:.2f}x |"
              f" {f_cpu:.1f} / {l_cpu:.1f}"
              f" | {r.db_cpu_ms:.1f} | {n.get('statements', 0):.0f} / {n.get('commits', 0):.0f}"
              f" | {r.conn_peak} ({r.conn_mean:.1f}) | {r.rss_mb:.0f} |")
    for r in runs:
        if r.error:
            print(f"\n!! {r.variant} with {r.workers} workers: {r.error}")
        if r.outages:
            print(f"\n!! {r.variant} with {r.workers} workers: the server was unreachable during"
                  f" the run ({r.outages} samples of {SAMPLE_SECONDS}s); its figures include it")
        if r.duplicates or r.failed:
            print(f"\n!! {r.variant} with {r.workers} workers: {r.rows} trial rows, {r.finished}"
                  f" finished, {r.failed} failed, {r.duplicates} duplicate numbers")


def print_breakdown(runs: list[Run]) -> None:
    by_w: dict[int, dict[str, Run]] = defaultdict(dict)
    for r in runs:
        by_w[r.workers][r.variant] = r
    for workers, pair in sorted(by_w.items()):
        cols = [(v, ph) for v in ("baseline", "before", "ours") if v in pair
                for ph in ("first", "last") if ph in pair[v].phases]
        if not cols:
            continue
        keys = sorted({k for v, ph in cols for k in pair[v].phases[ph].ms},
                      key=lambda k: -max(pair[v].phases[ph].ms.get(k, 0.0) for v, ph in cols))
        print(f"\nwhere a trial's wall time goes, {workers} worker(s): ms per trial (exclusive),"
              " (SQL statements per trial)")
        print("| | " + " | ".join(f"{v} {ph} 10%" for v, ph in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for key in keys:
            cells = []
            for v, ph in cols:
                phase = pair[v].phases[ph]
                value, stmts = phase.ms.get(key), phase.sql.get(key, 0.0)
                cells.append("" if value is None else
                             f"{value:.1f} ({stmts:.0f})" if stmts >= 0.5 else f"{value:.1f}")
            print(f"| {key} | " + " | ".join(cells) + " |")
        print("| **cycle (wall)** | " + " | ".join(
            f"**{pair[v].phases[ph].wall_ms:.1f}**" for v, ph in cols) + " |")
        for v in ("baseline", "before", "ours"):
            if v in pair and pair[v].beat_ms_per_s:
                print(f"({v}: background threads {pair[v].beat_ms_per_s:.2f} ms per second of"
                      " worker wall time)")


def print_profile(folder: Path, top: int) -> None:
    import pstats

    for prof in sorted(folder.glob("*/w0.prof")):
        print(f"\n--- cProfile of worker 0, {prof.parent.name} (top {top} by own time) ---")
        stats = pstats.Stats(str(prof))
        stats.sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="300 trials, workers 1,4,16 (the defaults of --trials/--workers otherwise)")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (1,4,16,64)")
    p.add_argument("--trials", type=int, default=None, help="trials per study (2000)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--sampler-startup", type=int, default=10, help="TPE n_startup_trials")
    p.add_argument("--pruner-startup", type=int, default=5, help="MedianPruner n_startup_trials")
    p.add_argument("--warmup", type=int, default=2, help="MedianPruner n_warmup_steps (epochs)")
    p.add_argument("--sides", default="baseline,ours",
                   help="which of baseline, ours, before to run, in this order for the first W")
    p.add_argument("--before", type=Path,
                   help="side 'before': our worker from this source tree, e.g. an earlier"
                        " version: git archive HEAD | tar -x -C DIR")
    p.add_argument("--sequential", action="store_true",
                   help="run the sides one after another instead of at the same time")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    p.add_argument("--profile", action="store_true", help="cProfile worker 0 of each run")
    p.add_argument("--keep", type=Path, help="keep logs and timings in this folder")
    p.add_argument("--role", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    p.add_argument("--timings", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--n-trials", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.role == "ours":
        return role_ours(args.timings, [a for a in rest if a != "--"])
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.role == "baseline":
        return role_baseline(args.timings, args)

    workers = [int(w) for w in (args.workers or ("1,4,16" if args.quick else "1,4,16,64"))
               .split(",")]
    args.trials = args.trials or (300 if args.quick else 2000)
    sides = args.sides.split(",")
    if "before" in sides and args.before is None:
        p.error("side 'before' needs --before DIR")
    import optuna

    limit, used = connection_room()
    print(f"orchestration at scale, {time.strftime('%Y-%m-%d %H:%M %Z')}: {args.trials} trials x"
          f" {args.epochs} instant epochs, 4 params, TPE start-up {args.sampler_startup},"
          f" median pruner start-up {args.pruner_startup} / warm-up {args.warmup};"
          f" optuna {optuna.__version__}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; PostgreSQL"
          f" max_connections {limit}, {used} in use by others at start;"
          f" load average {os.getloadavg()[0]:.2f}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_orch_"))
    work.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    try:
        for i, w in enumerate(workers):
            groups = [[s] for s in sides] if args.sequential else [sides]
            # Leave room for the other users of a shared server rather than make their
            # connections fail: Optuna's default pool keeps 2 connections per process; ours keeps
            # 1, and a second one for a moment when its heartbeat thread and its trial overlap.
            need = max(sum(2 * w if side == "baseline" else w + w // 4 for side in g) + len(g)
                       for g in groups)
            _, used = connection_room()
            if need + used + 10 > limit:
                print(f"skipped {w} workers: up to {need} connections needed, {limit - used}"
                      " free on the server")
                continue
            for group in groups if i % 2 == 0 else groups[::-1]:
                print(f"  {' + '.join(group)}, {w} worker(s) each... (load average"
                      f" {os.getloadavg()[0]:.2f})", flush=True)
                try:
                    done = run_group(group, w, args, work)
                except RuntimeError as e:
                    done = [Run(side, w, error=str(e)) for side in group]
                runs.extend(done)
                for run in done:
                    print(f"    {run.variant}: {run.finished} trials in {run.wall_s:.1f}s,"
                          f" {run.per_second:.1f} trials/s"
                          f"{'; ' + run.error.splitlines()[0] if run.error else ''}", flush=True)
                if len(workers) > 1:  # the figures so far, in case a later size never finishes
                    print_summary(done)
                    print_breakdown(done)
                    sys.stdout.flush()
        print_summary(runs)
        print_breakdown(runs)
        if args.profile:
            print_profile(work, 25)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
