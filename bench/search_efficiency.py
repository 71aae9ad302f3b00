"""Search efficiency: the staged pipeline (TPE + median pruner, one stage per parameter group)
against random search and against one joint TPE study, at equal budgets of training epochs.

What it answers: for the same number of epochs trained on digits, which search finds the more
accurate small ResNet, and which reaches a target validation accuracy in fewer epochs?

    .venv/bin/python bench/search_efficiency.py --quick     # ~6 minutes on an idle 2-core box
    .venv/bin/python bench/search_efficiency.py             # full: ~40 minutes idle
    .venv/bin/python bench/search_efficiency.py --quick --workdir runs/  # keep files; rerun
                                                            # after a kill reuses finished runs

The same ten parameters and ranges for every method (`space_text`): lr, batch_size, momentum,
warmup_epochs (optimizer); model depth, width, se (architecture); label_smoothing, weight_decay,
dropout (regularization). For each seed:

- **staged** (ours): `hpo run --workers 1 --threads 1` of a generated three-stage space file, the
  real service end to end. Each stage's trial budget is its share of the epoch budget divided by
  the epochs per trial, so the first two stages never spend more than their share; pruned trials
  spend less, and the last stage gets extra trials so that it, not an idle remainder, uses what
  pruning saved. The run is then cut at the epoch budget (below).
- **random**: Optuna's RandomSampler over all ten parameters at once, no pruning.
- **joint TPE**: one TPE study over all ten parameters with the same sampler and median-pruner
  settings as a stage of ours (multivariate, grouped, constant liar), so only the staging
  differs. Its first `startup` trials are random, as in each of our stages.

The two joint methods run in-process: an Optuna loop calling `trainer.train` on the config the
space file gives (`search.space` + `search.runtime.objective.suggest`, the same code our worker
samples with), so they share the trainer's data cache like a persistent worker.

Accounting, identical for all three: every trained epoch counts, in the order it was trained
(pruned trials count the epochs they ran). A run is cut at `--budget` epochs; the joint loops
stop there, our pipeline's surplus epochs are discarded. **Best** is the highest validation
accuracy of any epoch within the budget; **epochs to target** is the cumulative count of epochs
when an epoch first reaches `--target` (censored at the budget when no epoch does). Seed s sets
the training seed of every trial and the sampler seed of the joint methods; our worker seeds TPE
from its worker id (search/runtime/worker.py), so runs of ours share one SQLite database and start
one after another: in a fresh work folder the worker of seed s gets id s + 1.

The figures count epochs, not seconds, so load from other processes does not change them; the
wall times printed beside them do change with load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import child_env  # bench/, the script's folder, is on the path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("staged", "random", "tpe")
LABELS = {"staged": "staged TPE + median (ours)", "random": "random, no pruning",
          "tpe": "joint TPE + median"}
# Stage shares of the epoch budget: the optimizer matters most on digits, so it gets the most.
SHARES = (0.4, 0.3, 0.3)
# The last stage's trial budget, as a multiple of its share: pruned trials leave epochs unspent
# and the run is cut at the epoch budget anyway, so spare trials are never trained past it.
LAST_STAGE_SPARE = 2.0


@dataclass(frozen=True)
class Mode:
    budget: int  # epochs per run
    epochs: int  # per trial
    seeds: int
    widths: tuple[float, float]
    target: float
    startup: int  # random trials before TPE, and finished trials before the pruner acts
    warmup: int  # epochs a trial always runs before the pruner may stop it
    ladder: tuple[float, ...] = ()  # more targets, for the table of epochs to each


# What a run trains depends on these; seeds, target and ladder only change what is reported.
RUN_FIELDS = ("budget", "epochs", "widths", "startup", "warmup")


# Pruning waits until the next-to-last epoch, as in spaces/digits-quick.toml: on digits a good run
# can sit near chance (10%) until its third epoch, so earlier comparisons are mostly noise.
# Targets: the highest accuracy that separates the methods at that budget (in full mode the first
# random trials already pass 0.97).
QUICK = Mode(budget=120, epochs=4, seeds=3, widths=(0.25, 0.5), target=0.95, startup=4, warmup=3,
             ladder=(0.90, 0.93, 0.95, 0.96, 0.97))
FULL = Mode(budget=360, epochs=6, seeds=5, widths=(0.5, 1.0), target=0.985, startup=4, warmup=4,
            ladder=(0.97, 0.98, 0.985, 0.99))


def stage_params(widths: tuple[float, float]) -> list[tuple[str, str]]:
    """(stage name, TOML params table) for our three stages; the joint methods take all rows."""
    return [
        ("optimizer", """\
            lr = { low = 0.05, high = 0.5, log = true }
            batch_size = { choices = [32, 64, 128] }
            momentum = { low = 0.8, high = 0.95 }
            warmup_epochs = { low = 0.0, high = 2.0 }"""),
        ("architecture", f"""\
            model = {{ choices = ["resnet20", "resnet32"] }}
            width = {{ choices = [{widths[0]}, {widths[1]}] }}
            se = {{ choices = [false, true] }}"""),
        ("regularization", """\
            label_smoothing = { low = 0.0, high = 0.2 }
            weight_decay = { low = 1e-5, high = 1e-2, log = true }
            dropout = { low = 0.0, high = 0.3 }"""),
    ]


def space_text(mode: Mode, seed: int, *, joint: bool) -> str:
    """The space file: three stages for ours, one stage of all ten parameters for the others.
    Before its own stage a parameter has the value in [fixed] (the trainer's default otherwise):
    resnet20 at the larger width, no SE, label smoothing 0, weight decay 5e-4, dropout 0."""
    head = f"""\
        # Written by bench/search_efficiency.py ({"joint" if joint else "staged"}, seed {seed}).
        dataset = "digits"
        metric = "val_acc"
        [fixed]
        model = "resnet20"
        width = {mode.widths[1]}
        crop_pad = 1
        hflip = false
        seed = {seed}
        """
    knobs = (f"pruner = {{ startup_trials = {mode.startup}, warmup_epochs = {mode.warmup} }}\n"
             f"sampler = {{ startup_trials = {mode.startup} }}\n")
    stages = stage_params(mode.widths)
    if joint:
        trials = math.ceil(mode.budget / 2)  # a loop ends at the epoch budget, never by this
        rows = "\n".join(textwrap.dedent(p) for _, p in stages)
        return (textwrap.dedent(head) + f'[[stage]]\nname = "joint"\ntrials = {trials}\n'
                f"epochs = {mode.epochs}\n{knobs}[stage.params]\n{rows}\n")
    text = textwrap.dedent(head)
    for index, ((name, params), share) in enumerate(zip(stages, SHARES, strict=True)):
        trials = math.floor(mode.budget * share / mode.epochs)
        if index == len(stages) - 1:
            trials = math.ceil(trials * LAST_STAGE_SPARE)
        text += (f'\n[[stage]]\nname = "{name}"\ntrials = {trials}\nepochs = {mode.epochs}\n'
                 f"{knobs}[stage.params]\n{textwrap.dedent(params)}\n")
    return text


@dataclass
class Run:
    method: str
    seed: int
    curve: list[float] = field(default_factory=list)  # val_acc of every epoch, in training order
    trials: int = 0
    pruned: int = 0
    wall: float = 0.0
    note: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)  # ours: what each stage spent

    def cut(self, budget: int) -> list[float]:
        return self.curve[:budget]

    def best(self, budget: int) -> float:
        return max(self.cut(budget), default=0.0)

    def to_target(self, budget: int, target: float) -> int | None:
        for n, acc in enumerate(self.cut(budget), start=1):
            if acc >= target:
                return n
        return None


# --------------------------------------------------------------------------------------------
# The joint methods: an in-process Optuna loop over `trainer.train`.


class BudgetSpent(Exception):
    """Raised from the report callback when the run has trained its last allowed epoch."""


def run_joint(method: str, seed: int, mode: Mode, space: Path) -> Run:
    import optuna
    import torch

    from search.runtime.objective import suggest
    from search.space.spec import base_config, load_space
    from trainer.config import TrainConfig, with_overrides
    from trainer.train import train

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pipeline = load_space(space)
    stage = pipeline.stages[0]
    if method == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    else:
        # The worker's settings (search/runtime/worker.py), with the space file's startup counts.
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=stage.sampler.startup_trials, multivariate=True, group=True,
            constant_liar=True, seed=seed)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=stage.pruner.startup_trials,
                                             n_warmup_steps=stage.pruner.warmup_epochs)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    run = Run(method, seed)
    started = time.monotonic()
    while len(run.curve) < mode.budget:
        trial = study.ask()
        params = {name: suggest(trial, name, p) for name, p in stage.params.items()}
        cfg = with_overrides(TrainConfig(), {**base_config(pipeline, stage, {}), **params,
                                             "device": "cpu"})

        def report(epoch: int, metrics: dict[str, Any], trial: optuna.Trial = trial) -> None:
            run.curve.append(metrics["val_acc"])
            trial.report(metrics["val_acc"], epoch)
            if len(run.curve) >= mode.budget:
                raise BudgetSpent
            # As the worker does: never prune after the last epoch.
            if epoch < mode.epochs and trial.should_prune():
                raise optuna.TrialPruned

        run.trials += 1
        try:
            result = train(cfg, report)
            study.tell(trial, result.val_acc)
        except optuna.TrialPruned:
            run.pruned += 1
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except BudgetSpent:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    run.wall = time.monotonic() - started
    return run


# --------------------------------------------------------------------------------------------
# Ours: `hpo run` of the staged space file, read back from its database.


def run_staged(seed: int, mode: Mode, space: Path, work: Path, url: str) -> Run:
    started = time.monotonic()
    log = work / f"staged-s{seed}.log"
    # A fresh study each time: a run that was killed leaves its study behind, half done.
    study = f"eff-s{seed}-{uuid.uuid4().hex[:8]}"
    with log.open("w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "search.cli", "run", "--space", str(space),
             "--study", study, "--storage", url, "--workers", "1", "--threads", "1",
             "--device", "cpu", "--artifacts", str(work / "artifacts")],
            cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
        ).returncode
    if code != 0:
        raise RuntimeError(f"hpo run for seed {seed} exited {code}; see {log}")
    run = read_staged(seed, study, url)
    run.wall = time.monotonic() - started
    return run


def read_staged(seed: int, name: str, url: str) -> Run:
    import optuna

    from search.db import pipeline
    from search.db.storage import open_storage

    storage = open_storage(url)
    pipe = pipeline.load(storage, name)
    trials: list[tuple[Any, str]] = []
    for stage in pipe.stages:
        study = pipeline.load_stage_study(storage, name, stage)
        trials += [(t, stage.name) for t in study.get_trials(deepcopy=False)
                   if t.datetime_start is not None]
    trials.sort(key=lambda ts: ts[0].datetime_start)  # one worker: the order they were trained
    run = Run("staged", seed)
    for t, stage in trials:
        accs = [e["val_acc"] for e in t.user_attrs.get("epochs", [])]
        if not run.stages or run.stages[-1]["name"] != stage:
            run.stages.append({"name": stage, "trials": 0, "first": len(run.curve) + 1})
        run.stages[-1]["trials"] += 1
        run.stages[-1]["last"] = len(run.curve) + len(accs)
        run.curve += accs
        run.trials += 1
        run.pruned += t.state == optuna.trial.TrialState.PRUNED
    worker = trials[0][0].user_attrs.get("worker", "?") if trials else "?"
    run.note = f"worker {worker.rsplit('#', 1)[-1]}, {len(run.curve)} epochs trained in all"
    return run


# --------------------------------------------------------------------------------------------
# Orchestration: runs as subprocesses, `--jobs` at a time, never two of ours at once (so our
# worker ids, and with them its TPE seeds, follow the seeds).


def finished(out: Path, mode: Mode) -> Run | None:
    """The run stored in `out` by an earlier invocation with the same mode, if there is one."""
    try:
        stored = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    wanted = json.loads(json.dumps(asdict(mode)))
    if any(stored.get("mode", {}).get(k) != wanted[k] for k in RUN_FIELDS):
        return None
    return Run(**stored["run"])


def run_all(mode: Mode, work: Path, jobs: int, methods: tuple[str, ...]) -> list[Run]:
    url = f"sqlite:///{work / 'staged.db'}"
    runs: list[Run] = []
    todo: list[tuple[str, int]] = []
    for seed in range(mode.seeds):
        for method in methods:
            done = finished(work / f"{method}-s{seed}.json", mode)
            if done is None:
                todo.append((method, seed))
            else:
                runs.append(done)
                print(f"  kept from an earlier run in {work}: {method} seed {seed}")
    running: list[tuple[str, int, subprocess.Popen, Path]] = []
    while todo or running:
        for item in list(running):
            method, seed, proc, out = item
            if proc.poll() is None:
                continue
            running.remove(item)
            run = finished(out, mode) if proc.returncode == 0 else None
            if run is None:
                raise SystemExit(f"{method} seed {seed} failed; see {out}.log")
            runs.append(run)
            print(f"  done: {LABELS[method]:<26} seed {seed}: best {run.best(mode.budget):.4f},"
                  f" to target {run.to_target(mode.budget, mode.target) or '-'},"
                  f" {run.trials} trials ({run.pruned} pruned), {run.wall:.0f} s,"
                  f" load {os.getloadavg()[0]:.1f}", flush=True)
        staged_busy = any(m == "staged" for m, *_ in running)
        for item in list(todo):
            if len(running) >= jobs:
                break
            method, seed = item
            if method == "staged" and staged_busy:
                continue
            todo.remove(item)
            out = work / f"{method}-s{seed}.json"
            cmd = [sys.executable, __file__, "--role", method, "--seed", str(seed),
                   "--out", str(out), "--work", str(work), "--url", url,
                   "--mode", json.dumps(asdict(mode))]
            log = (work / f"{method}-s{seed}.json.log").open("w")
            running.append((method, seed, subprocess.Popen(
                cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT), out))
            staged_busy = staged_busy or method == "staged"
        time.sleep(0.5)
    return runs


def role(args: argparse.Namespace, mode: Mode) -> int:
    joint = args.role != "staged"
    space = args.work / f"{args.role}-s{args.seed}.toml"
    space.write_text(space_text(mode, args.seed, joint=joint))
    if joint:
        run = run_joint(args.role, args.seed, mode, space)
    else:
        run = run_staged(args.seed, mode, space, args.work, args.url)
    args.out.write_text(json.dumps({"mode": asdict(mode), "run": asdict(run)}))
    return 0


# --------------------------------------------------------------------------------------------
# Report.


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(mode: Mode, runs: list[Run], methods: tuple[str, ...], wall: float,
           load_start: float) -> None:
    import optuna
    import torch

    budget = mode.budget
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\nsearch efficiency, {today}: digits, budget {budget} epochs per run,"
          f" {mode.epochs} epochs per trial, {mode.seeds} seeds, widths {mode.widths},"
          f" target val_acc {mode.target}; sampler/pruner startup {mode.startup},"
          f" pruning from epoch {mode.warmup}")
    print(f"{os.cpu_count()} cores, 1 thread per run; optuna {optuna.__version__},"
          f" torch {torch.__version__}; load average (1 min) {load_start:.2f} at start,"
          f" {os.getloadavg()[0]:.2f} at end; {wall / 60:.1f} min in all")
    by_method = {m: sorted((r for r in runs if r.method == m), key=lambda r: r.seed)
                 for m in methods}
    print(f"\n{'method':<27}{'best val_acc':>18}{'epochs to target':>30}{'epochs':>8}"
          f"{'trials':>8}{'pruned':>8}{'wall s':>8}")
    for method, mine in by_method.items():
        hits = [r.to_target(budget, mode.target) for r in mine]
        reached = [h for h in hits if h is not None]
        text = (f"{statistics.mean(reached):.0f} (range {min(reached)}-{max(reached)})"
                if reached else "-")
        text += f", {len(reached)}/{len(hits)} reached"
        print(f"{LABELS[method]:<27}{mean_std([r.best(budget) for r in mine]):>18}{text:>30}"
              f"{statistics.mean(len(r.cut(budget)) for r in mine):>8.0f}"
              f"{statistics.mean(r.trials for r in mine):>8.1f}"
              f"{statistics.mean(r.pruned for r in mine):>8.1f}"
              f"{statistics.mean(r.wall for r in mine):>8.0f}")
    if mode.ladder:
        print("\nepochs to reach each accuracy: mean over seeds (a run that never did counted as"
              f" {budget}), and how many seeds reached it:")
        print(f"  {'':<27}" + "".join(f"{t:>14}" for t in mode.ladder))
        for method, mine in by_method.items():
            cells = []
            for t in mode.ladder:
                hits = [r.to_target(budget, t) for r in mine]
                reached = sum(h is not None for h in hits)
                mean = statistics.mean(h or budget for h in hits)
                cells.append(f"{mean:.0f} ({reached}/{len(hits)})")
            print(f"  {LABELS[method]:<27}" + "".join(f"{c:>14}" for c in cells))
    fractions = (0.25, 0.5, 0.75, 1.0)
    print("\nbest val_acc so far, mean over seeds, at a fraction of the budget:")
    print(f"  {'':<27}" + "".join(f"{f'{f:.0%} ({round(budget * f)})':>14}" for f in fractions))
    for method, mine in by_method.items():
        cells = [statistics.mean(r.best(round(budget * f)) for r in mine) for f in fractions]
        print(f"  {LABELS[method]:<27}" + "".join(f"{c:>14.4f}" for c in cells))
    print("\nper seed (best val_acc / epochs to target, '-' = not within the budget):")
    for method, mine in by_method.items():
        cells = [f"s{r.seed}: {r.best(budget):.4f} / {r.to_target(budget, mode.target) or '-'}"
                 for r in mine]
        print(f"  {LABELS[method]:<27}" + "; ".join(cells))
    for r in by_method.get("staged", []):
        parts = []
        for st in r.stages:
            first, last = st["first"], min(st["last"], budget)
            if first > budget:
                parts.append(f"{st['name']} not reached")
                continue
            best = max(r.curve[first - 1:last], default=0.0)
            parts.append(f"{st['name']} epochs {first}-{last} ({st['trials']} trials),"
                         f" best {best:.4f}")
        print(f"  ours s{r.seed} ({r.note}): " + "; ".join(parts))
    if "staged" in by_method:
        # Censored runs count as the budget: a lower bound of what they would have needed.
        def mean_hits(rs: list[Run]) -> float:
            return statistics.mean(r.to_target(budget, mode.target) or budget for r in rs)

        def mean_best(rs: list[Run]) -> float:
            return statistics.mean(r.best(budget) for r in rs)

        ours = by_method["staged"]
        for other, theirs in by_method.items():
            if other != "staged":
                print(f"summary: ours vs {LABELS[other]}: best {mean_best(ours):.4f} vs"
                      f" {mean_best(theirs):.4f}; epochs to {mode.target}"
                      f" {mean_hits(ours):.0f} vs {mean_hits(theirs):.0f}"
                      f" (a run that never reached it counted as {budget})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"budget {QUICK.budget} epochs, {QUICK.epochs} per trial,"
                        f" {QUICK.seeds} seeds, widths {QUICK.widths} (a few minutes)")
    p.add_argument("--seeds", type=int, help="override the mode's number of seeds")
    p.add_argument("--budget", type=int, help="override the mode's epochs per run")
    p.add_argument("--target", type=float, help="override the mode's target val_acc")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, 1 thread each (default 2)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--workdir", type=Path, help="keep files here (default: a temporary folder)")
    p.add_argument("--role", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.mode:
        fields = json.loads(args.mode)
        mode = Mode(**{**fields, "widths": tuple(fields["widths"]),
                       "ladder": tuple(fields["ladder"])})
    overrides = {k: v for k, v in (("seeds", args.seeds), ("budget", args.budget),
                                   ("target", args.target)) if v is not None}
    if overrides:
        mode = Mode(**{**asdict(mode), **overrides})
    if args.role:
        return role(args, mode)

    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {METHODS}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    started = time.monotonic()
    print(f"{len(methods)} methods x {mode.seeds} seeds, {args.jobs} at a time, in {work}",
          flush=True)
    try:
        runs = run_all(mode, work, args.jobs, methods)
        report(mode, runs, methods, time.monotonic() - started, load_start)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
