"""Search efficiency: the staged pipeline (TPE + median pruner, one stage per parameter group),
one pass and two (cyclic), against random search, one joint TPE study with the median pruner and
one with Hyperband, at equal budgets of training epochs.

What it answers: for the same number of epochs trained on a task (digits, or the offline hard
tasks of trainer/hard_tasks.py), which search finds the more accurate small ResNet, and how many
epochs each needs to reach random search's final mean best (the goal: a third of random's)?

    .venv/bin/python bench/search_efficiency.py --quick     # digits, 2 seeds: ~8 minutes idle
    .venv/bin/python bench/search_efficiency.py --quick --task digits-hard   # ~10-12 minutes
    # full, 5 seeds a task, one run at a time, resumable: the committed results folder
    .venv/bin/python bench/search_efficiency.py --task digits-hard --jobs 1 \
        --workdir bench/results/search-efficiency     # its digits-hard-full/ folder

With --workdir each run's result is `<workdir>/<task>-<quick|full>/<method>-s<seed>.json`; an
invocation reuses those that trained what it would (the same RUN_FIELDS and the same generated
space file) and runs the rest, seed by seed, so a killed benchmark continues where it stopped.

The same ten parameters and ranges for every method (`space_text`): lr, batch_size, momentum,
warmup_epochs (optimizer); model depth, width, se (architecture); label_smoothing, weight_decay,
dropout (regularization). For each seed:

- **staged** (ours): `hpo run --workers 1 --threads 1` of a generated three-stage space file, the
  real service end to end. Each stage but the last gets its share of the epoch budget in whole
  trials (rounded down), so every stage starts within the budget even if nothing is pruned; the
  last gets enough trials to spend what the others left even if every trial were pruned at the
  earliest epoch (`stage_trials`). The service is stopped once it has trained the budget's
  epochs, and the run is cut there (below).
- **cyclic**: the same stages twice (optimizer, architecture, regularization, then each again,
  warm-started), written out as the six stages `cycles = 2` expands to so that only the last
  stage of the second pass carries the spare trials; each pass gets half of each share.
- **patience**: cyclic, each stage but the last closed early once it stops improving (PATIENCE).
- **screened**: the three stages once with a `[screen]` table: a first stage over all ten
  parameters (its `startup` trials random, then joint TPE) with SCREEN of the budget, the
  stages the rest, the first opening from the screen's best.
- **coupled**: the optimizer and regularization parameters as one stage ("training"), then the
  architecture, then "training" again warm-started, with COUPLED of the budget.
- **ordered**: the groups in the order of the headroom the one-pass runs measured: optimizer,
  regularization, architecture, then the optimizer again, warm-started (ORDERED).
- **regtwice**: the same order with regularization again last, warm-started (REGTWICE);
  **ordreg** the same with `ordered`'s shares; **centred** regtwice with the later groups'
  continuous parameters at the centres of their ranges until their stage; **regpat** regtwice
  with patience on its architecture stage (REGPAT); **strat** regtwice with stratified start-up
  trials in every stage; **stratopt** the same in the optimizer stage only (STRATIFIED);
  **prior** stratopt whose optimizer stage first trains the best configuration of an earlier
  study of the other hard task (`start` in the space file; PRIOR; the hard tasks only).
- **random**: Optuna's RandomSampler over all ten parameters at once, no pruning.
- **joint TPE**: one TPE study over all ten parameters with the same sampler and median-pruner
  settings as a stage of ours (multivariate, grouped, constant liar), so only the staging
  differs. Its first `startup` trials are random, as in each of our stages.
- **hyperband**: joint TPE as above with Optuna's HyperbandPruner, epochs as the resource
  (min_resource 1, up to the epochs per trial, reduction_factor 3).

The two joint methods run in-process: an Optuna loop calling `trainer.train` on the config the
space file gives (`search.space` + `search.runtime.objective.suggest`, the same code our worker
samples with), so they share the trainer's data cache like a persistent worker.

Accounting, identical for all methods: every trained epoch counts, in the order it was trained
(pruned trials count the epochs they ran). A run is cut at `--budget` epochs; the joint loops
stop there, our pipeline's surplus epochs are discarded. **Best** is the highest validation
accuracy of any epoch within the budget; **epochs to target** is the cumulative count of epochs
when an epoch first reaches `--target` (censored at the budget when no epoch does). Seed s sets
the training seed of every trial and the sampler seed of the joint methods; our worker seeds TPE
from its worker id (search/runtime/worker.py), so each run of ours has a SQLite database of its
own in which the worker of seed s gets id s + 1.

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
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import child_env  # bench/, the script's folder, is on the path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("staged", "cyclic", "random", "tpe", "hyperband", "patience", "screened", "coupled",
           "ordered", "regtwice", "ordreg", "centred", "regpat", "strat", "stratopt", "prior",
           "priorhb", "randstart", "tpestart", "hbstart")
LABELS = {"staged": "staged TPE + median (ours)", "cyclic": "cyclic staged, 2 passes",
          "patience": "cyclic + patience", "screened": "joint screen, then stages",
          "coupled": "opt+reg, arch, opt+reg", "ordered": "opt, reg, arch, opt-2",
          "regtwice": "opt, reg, arch, reg-2, .40", "ordreg": "opt, reg, arch, reg-2, .35",
          "centred": "regtwice, centred base",
          "regpat": "regtwice, arch patience",
          "strat": "regtwice, stratified start",
          "stratopt": "regtwice, stratified opt",
          "prior": "stratopt + earlier start",
          "priorhb": "prior, Hyperband stages",
          "random": "random, no pruning", "tpe": "joint TPE + median",
          "hyperband": "joint TPE + Hyperband",
          "randstart": "random + start", "tpestart": "joint TPE + median + start",
          "hbstart": "joint Hyperband + start"}
# What runs without --methods (`make bench`): one pass as it was, the order the shipped
# spaces/cifar10-resnet.toml uses, and the three baselines; the other methods are measured
# ideas, kept so that their committed runs can be read again (BENCHMARKS.md).
DEFAULT_METHODS = ("staged", "stratopt", "random", "tpe", "hyperband")
# The methods that run `hpo run` (the service) rather than an in-process Optuna loop.
SERVICE = ("staged", "cyclic", "patience", "screened", "coupled", "ordered", "regtwice",
           "ordreg", "centred", "regpat", "strat", "stratopt", "prior", "priorhb")
# `patience`: cyclic, each stage but the last closed once this many trials in a row have not
# improved its best, its unspent trials passed on to the next (search/db/writes.py), by stage.
# Measured on digits-hard (BENCHMARKS.md), the architecture stages improved the best in 2 of 14
# runs: a stage whose group has no headroom at this budget should not keep its whole share.
PATIENCE = {"optimizer": 3, "architecture": 2, "regularization": 2}
# Passes of the stages for `cyclic`. Of the three ways to revisit early choices that the space
# file offers, a second warm-started pass (`cycles = 2`) measured best on tabular benchmarks (best
# average rank, 108% of the gap to joint TPE closed, against 90% for a final joint stage; patience
# was only as good as it), and it is the one that changes nothing but the revisiting.
CYCLES = 2
TASKS = ("digits", "digits-hard", "synthetic-hard")
# Stage shares of the epoch budget: the optimizer matters most on digits, so it gets the most.
# `cyclic` gives each pass 1/CYCLES of each share (`stage_trials`).
SHARES = (0.4, 0.3, 0.3)
# `screened`: a first stage over all ten parameters at once (its TPE warm-up random, then joint
# TPE) gets this share of the budget, the three stages the rest in SHARES, one pass from its best.
# Why it was tried: in seeds 0-3 the joint methods' first two trials over every parameter beat the
# optimizer stage's first two on the default base by 0.06 (digits-hard 0.942 against 0.877), and
# joint TPE found its best within 36 of 120 epochs on digits-hard. Measured since (2 seeds a
# task, BENCHMARKS.md) it did not help: those first trials were lucky draws of those seeds, and
# most random configurations do not train in 4 epochs, so a screen is a short random search.
SCREEN = 0.3
# `coupled`: the optimizer and regularization groups as one first stage ("training"), then the
# architecture, then "training" again warm-started, with these shares. Why: on digits-hard the
# headroom is in regularization, which the fixed order reaches only after 60% of the budget
# (epoch 73-77), and the learning rate, weight decay and label smoothing interact (the effective
# step is lr x weight decay); the architecture group raised the best in 0 of 18 cyclic stages
# there, so it gets the smallest share. The last stage's base is usually the first's (the
# architecture kept), so its warm start holds every trial of the first.
COUPLED = (0.6, 0.2, 0.2)
# `ordered`: the groups by the headroom measured in the one-pass runs (stages that raised the
# best so far: optimizer 16/16, regularization 10/16, architecture 5/16 over both hard tasks), so
# the optimizer first (it alone makes a 4-epoch trial train), then regularization on the rate it
# found, then the architecture, then the optimizer again, warm-started, on the configuration the
# others chose (the second optimizer stage of `cyclic` raised the best in 3 of 4 digits-hard
# seeds: the rate found on the base need not suit the regularized model). The architecture
# cannot be last: its space is 8 configurations, one carried in, so it closes after 7 trials and
# a last stage must be a continuum that can spend what the others left.
ORDERED = (0.35, 0.3, 0.2, 0.15)
# `regtwice`: the same order, but the optimizer keeps one pass's share (a 10-trial optimizer
# stage missed the rate a 12-trial one found in synthetic-hard seed 3) and the last stage is
# regularization again, warm-started, on the architecture chosen: on synthetic-hard the one-pass
# regularization stage, which runs on the chosen architecture, raised the best in 4 of 6 seeds,
# the `ordered` one on the base architecture in 2 of 6.
REGTWICE = (0.4, 0.25, 0.2, 0.15)
# `ordreg`: `ordered`'s shares (its 9-trial regularization stage raised the best in 9 of 10
# digits-hard seeds) with `regtwice`'s last stage (regularization again raised it in 7 of 10
# digits-hard seeds and 3 of 6 synthetic-hard ones, `ordered`'s second optimizer stage in 3 of 10
# and 1 of 6). Measured, it was below `regtwice` on both tasks: BENCHMARKS.md.
# `centred`: `regtwice`, but until its own stage a continuous parameter of a later stage sits at
# the centre of its range (geometric for a log range: weight decay 3.2e-4) instead of the
# trainer's default (label smoothing 0, dropout 0, at the edge of their ranges). Why: the
# optimizer stage picks the rate for the model the later stages will regularize, and the joint
# methods, which sample every parameter from the first trial, reached random search's final best
# on digits-hard in 33 epochs a seed against regtwice's 45; the learning rate and the
# regularization interact (the effective step is lr x weight decay). Categorical parameters
# (the architecture) have no centre and keep [fixed]. Measured, rejected (BENCHMARKS.md): the
# optimizer stage's best fell in all 6 synthetic-hard seeds (a regularized model trains slower
# in a 4-epoch trial), and on digits-hard what the first half gained was lost by the end.
# `regpat`: `regtwice` with the architecture stage closed once 2 of its trials in a row have not
# improved its best, its unspent trials passed on to regularization-2. Why: in regtwice's runs
# the architecture stage raised the best in 4 of 10 digits-hard seeds and 0 of 6 synthetic-hard
# ones, regularization-2 in 7 of 10 and 3 of 6, by 0.005-0.023 on digits-hard, mostly after 75%
# of the budget; closing the architecture early brings those raises forward. Measured: the
# same as regtwice to within 0.001 (BENCHMARKS.md); the raises come late in the last stage.
REGPAT = {"architecture": 2}
# `strat`: `regtwice` with every stage's start-up trials stratified (a Latin hypercube,
# `sampler = { stratified = true }`, search/runtime/startup.py). Why: in regpat's 10 digits-hard
# runs (the same trials as regtwice's through the optimizer stage) the 3 seeds whose TPE never
# trained batch size 64 after the start-up ended that stage at 0.9386 on average, the 7 that did
# at 0.9506; in one of the 3 the 4 random start-up trials were all 128, in the other two the one
# at 64 had a rate under 0.1 (0.067, 0.094) and trained poorly. Four strata take each batch size and
# each quarter of the log rate range once, instead of clustering by chance. Measured
# (BENCHMARKS.md): above every baseline at 50/75/100% on digits-hard and at random's final best
# within a third of random's epochs on both tasks' mean curves, but below the best baseline at
# 75% and 100% on synthetic-hard, and below regtwice there in 5 of 6 seeds.
# `stratopt`: `strat`'s stratified start-up in the optimizer stage only, the later stages as in
# regtwice. Why: strat's gain on digits-hard came from the optimizer stage (its best there above
# regtwice's in 6 of 10 seeds), its loss on synthetic-hard from the later stages (they raised the
# best in 4 of 12 regularization stages against regtwice's 6 of 12): a 7-trial regularization
# stage whose 4 start-up trials must cover every quarter of dropout and label smoothing spends
# half of itself on corners that do not train in 4 epochs. Measured (BENCHMARKS.md, 10 seeds a
# task): above every baseline at 50/75/100% on digits-hard and at 50/75% on synthetic-hard, 0.0003
# behind joint TPE at 100% there; ahead of regtwice in all six cells on average; at random's
# final best in 0.42 and 0.38 of random's epochs (mean curve). The shipped CIFAR file's shape.
STRATIFIED = {"strat": ("optimizer", "regularization", "architecture", "regularization-2"),
              "stratopt": ("optimizer",), "prior": ("optimizer",), "priorhb": ("optimizer",)}
# `prior`: `stratopt` whose optimizer stage trains first (`start` in the space file) the best
# optimizer-stage configuration of one earlier `stratopt` study (seed 0) of the *other* hard task:
# what a user who tuned a related dataset before brings. Why: random search's final best is a
# high bar (2-4% of its own trials reach it), and a design that knows nothing of the space before
# its first trial reaches it at about that rate, so the mean over seeds gets there in 0.38-0.42
# of random's epochs, not a third; a configuration that did well on a related task reached it
# in 5 of 10 seeds on digits-hard and 4 of 10 on synthetic-hard, trained alone (BENCHMARKS.md).
# Both tasks' seed-0 studies ranked first the same trial (seed 0 drew the same first stratified
# trial on both), so each task's start is that configuration, rounded as a person would copy it.
PRIOR = {task: {"lr": 1.035, "batch_size": 64, "momentum": 0.877, "warmup_epochs": 1.85}
         for task in ("digits-hard", "synthetic-hard")}
# The methods of ours whose optimizer stage starts from PRIOR.
FROM_PRIOR = ("prior", "priorhb")
# `priorhb`: `prior` with Optuna's Hyperband pruner in every stage (`pruner = { type =
# "hyperband" }`, epochs from 1, reduction factor 3, as the `hyperband` baseline), the last
# stage's trials sized for trials stopped at epoch 1, the others' shares of the budget at
# HYPERBAND_PER_TRIAL epochs a trial (`hbstart` measured 2.3 on digits-hard: 120 epochs in 53
# trials on average over seeds 0-2). Why: given the same start, joint TPE with
# Hyperband led `prior` at 75% and 100% on digits-hard (BENCHMARKS.md, "The baselines given the
# same start"), where the median pruner lets no trial stop before epoch 3. Measured there: below
# `prior` at every fraction; its stages trained 2.2 epochs a trial, so in 3 of 10 seeds the last
# stage never started.
HYPERBAND_STAGES = ("priorhb",)
HYPERBAND_PER_TRIAL = 2.0
# `randstart`, `tpestart`, `hbstart`: each baseline given what `prior` is given, its first trial
# the configuration `prior` trains first (PRIOR, the other parameters at the values `prior`'s
# first stage trains them with), queued with Optuna's `enqueue_trial` as a user of a plain
# study would. Why: `prior` against the plain baselines compares a search that knows a good
# configuration with ones that do not; the criterion asks what staging itself adds.
STARTED = {"randstart": "random", "tpestart": "tpe", "hbstart": "hyperband"}


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
    dataset: str = "digits"
    lr: tuple[float, float] = (0.05, 0.5)  # the learning rate's range (log)
    batches: tuple[int, ...] = (32, 64, 128)  # batch size choices


# What a run trains depends on these; seeds, target and ladder only change what is reported.
RUN_FIELDS = ("budget", "epochs", "widths", "startup", "warmup", "dataset", "lr", "batches")
TUPLE_FIELDS = ("widths", "ladder", "lr", "batches")


# Pruning waits until the next-to-last epoch, as in spaces/digits-quick.toml: on digits a good run
# can sit near chance (10%) until its third epoch, so earlier comparisons are mostly noise.
# Targets: the highest accuracy that separates the methods at that budget (in full mode the first
# random trials already pass 0.97).
QUICK = Mode(budget=120, epochs=4, seeds=3, widths=(0.25, 0.5), target=0.95, startup=4, warmup=3,
             ladder=(0.90, 0.93, 0.95, 0.96, 0.97))
FULL = Mode(budget=360, epochs=6, seeds=5, widths=(0.5, 1.0), target=0.985, startup=4, warmup=4,
            ladder=(0.97, 0.98, 0.985, 0.99))
# The hard tasks (trainer/hard_tasks.py): 16x16 images, ~5,000 to train on, so an epoch of a
# width-0.25/0.5 ResNet-20 takes 3.5-5 s on one thread (measured 2026-12-02), ten times
# digits'. Their quick modes were meant for 5 methods x 2 seeds, 2 at a time, in about 10
# minutes: 27 epochs a run, 3 per trial; measured, 14.7 minutes at load 2-3 (BENCHMARKS.md).
# Both need a learning rate near 1 (README), so its range reaches 2; batches of 32 are left
# out to keep epochs short on the CPU. Their full modes are sized for one thread beside other
# work: 120 epochs a run, 4 per trial (2.3-3.4 s an epoch, so about 30 minutes for the five
# methods of one seed, 2.5 hours a task), with --workdir keeping each finished run for the next
# session (bench/README.md).
HARD = {"lr": (0.05, 2.0), "batches": (64, 128, 256), "widths": (0.25, 0.5)}
MODES = {
    "digits": {"quick": Mode(**{**asdict(QUICK), "seeds": 2}), "full": FULL},
    "digits-hard": {
        "quick": Mode(budget=27, epochs=3, seeds=2, target=0.70, startup=2, warmup=2,
                      ladder=(0.6, 0.7, 0.8, 0.85), dataset="digits-hard", **HARD),
        "full": Mode(budget=120, epochs=4, seeds=5, target=0.93, startup=4, warmup=3,
                     ladder=(0.85, 0.9, 0.93, 0.95), dataset="digits-hard", **HARD)},
    "synthetic-hard": {
        "quick": Mode(budget=27, epochs=3, seeds=2, target=0.35, startup=2, warmup=2,
                      ladder=(0.3, 0.4, 0.5), dataset="synthetic-hard", **HARD),
        "full": Mode(budget=120, epochs=4, seeds=5, target=0.55, startup=4, warmup=3,
                     ladder=(0.45, 0.5, 0.55, 0.6), dataset="synthetic-hard", **HARD)},
}


def stage_params(mode: Mode) -> list[tuple[str, str]]:
    """(stage name, TOML params table) for our three stages; the joint methods take all rows."""
    widths, batches = mode.widths, ", ".join(str(b) for b in mode.batches)
    return [
        ("optimizer", f"""\
            lr = {{ low = {mode.lr[0]}, high = {mode.lr[1]}, log = true }}
            batch_size = {{ choices = [{batches}] }}
            momentum = {{ low = 0.8, high = 0.95 }}
            warmup_epochs = {{ low = 0.0, high = 2.0 }}"""),
        ("architecture", f"""\
            model = {{ choices = ["resnet20", "resnet32"] }}
            width = {{ choices = [{widths[0]}, {widths[1]}] }}
            se = {{ choices = [false, true] }}"""),
        ("regularization", """\
            label_smoothing = { low = 0.0, high = 0.2 }
            weight_decay = { low = 1e-5, high = 1e-2, log = true }
            dropout = { low = 0.0, high = 0.3 }"""),
    ]


def configurations(params: str) -> int | None:
    """How many distinct configurations a stage's params table allows; None for a continuum. A
    stage closes once it has trained each (search/space/grid.py), so it may use fewer trials."""
    table = tomllib.loads(textwrap.dedent(params))
    if not table or not all("choices" in p for p in table.values()):
        return None
    return math.prod(len(p["choices"]) for p in table.values())


def least_epochs(mode: Mode) -> int:
    """The fewest epochs a trial of our stages trains: the median pruner acts from epoch
    `warmup` on (search/runtime/algorithms.py) and never after the last epoch."""
    return mode.epochs if mode.warmup >= mode.epochs else max(1, mode.warmup)


def coupled_params(mode: Mode) -> list[tuple[str, str]]:
    """The stages of `coupled`: optimizer and regularization together, the architecture, and
    the first again (named `training-2`)."""
    (_, optimizer), (_, architecture), (_, regularization) = stage_params(mode)
    training = f"{optimizer}\n{regularization}"
    return [("training", training), ("architecture", architecture), ("training-2", training)]


def ordered_params(mode: Mode, again: str = "optimizer") -> list[tuple[str, str]]:
    """The stages of `ordered`: optimizer, regularization, architecture, then the group `again`
    a second time (named `<group>-2`)."""
    groups = dict(stage_params(mode))
    return [(name, groups[name]) for name in ("optimizer", "regularization", "architecture")] + [
        (f"{again}-2", groups[again])]


def centres(stages: list[tuple[str, str]]) -> dict[str, float]:
    """The centre of each continuous range of every stage but the first (geometric for a log
    range), for a parameter the first stage does not search: `centred`'s [fixed] values."""
    first = tomllib.loads(textwrap.dedent(stages[0][1]))
    out: dict[str, float] = {}
    for _, params in stages[1:]:
        for key, spec in tomllib.loads(textwrap.dedent(params)).items():
            if key in first or key in out or "low" not in spec:
                continue
            low, high = spec["low"], spec["high"]
            out[key] = math.sqrt(low * high) if spec.get("log") else (low + high) / 2
    return out


def stage_trials(mode: Mode, cycles: int, screen: float = 0.0, *,
                 stages: list[tuple[str, str]] | None = None,
                 shares: Sequence[float] = SHARES, least: int | None = None,
                 per_trial: float | None = None) -> list[int]:
    """Trial budgets of our stages in the order they run, `cycles` passes of `shares` over
    `stages` (default: stage_params, SHARES); with a `screen` share, first a joint stage of that
    share and the shares scaled to the rest.

    Every stage but the last gets its share of the epoch budget in whole trials, rounded down,
    so that even with nothing pruned every stage of every pass starts within the budget. The
    last one gets enough trials to spend whatever the others left, even if all of them and all
    of its own were pruned at the earliest epoch (a stage with few configurations counted at
    that many trials): the run is cut at the epoch budget, so what pruning saved is spent, and
    trials past the budget are trained but discarded. `least` overrides that earliest epoch
    (least_epochs), for a pruner that acts sooner than the median's warm-up, and `per_trial`
    the epochs a trial is expected to train in converting shares to trials (mode.epochs: all
    of them), for a pruner that stops most trials early."""
    stages = (stages or stage_params(mode)) * cycles
    shares = [share * (1 - screen) / cycles for share in shares] * cycles
    if screen:
        stages = [("screen", ""), *stages]  # a continuum: configurations("") is None
        shares = [screen, *shares]
    per = per_trial or mode.epochs
    trials = [max(1, math.floor(mode.budget * share / per)) for share in shares[:-1]]
    least = least or least_epochs(mode)
    spent = sum(least * min(t, configurations(params) or t)
                for t, (_, params) in zip(trials, stages, strict=False))
    trials.append(max(1, math.ceil((mode.budget - spent) / least)))
    return trials


def space_text(mode: Mode, seed: int, *, method: str) -> str:
    """The space file: three stages for ours (twice for `cyclic`), one stage of all ten
    parameters for the others.
    Before its own stage a parameter has the value in [fixed] (the trainer's default otherwise):
    resnet20 at the larger width, no SE, label smoothing 0, weight decay 5e-4, dropout 0.
    `cyclic` writes out the six stages that `cycles = 2` expands to (pass 2 named `<name>-2`,
    warm-started; search/space/spec.py) because `cycles` repeats each stage's trial budget, and
    only the last stage of the last pass may carry the trials that spend what pruning saved."""
    joint = method not in SERVICE
    cycles = CYCLES if method in ("cyclic", "patience") else 1
    head = f"""\
        # Written by bench/search_efficiency.py ({method}, seed {seed}).
        dataset = "{mode.dataset}"
        metric = "val_acc"
        [fixed]
        model = "resnet20"
        width = {mode.widths[1]}
        crop_pad = 1
        hflip = false
        seed = {seed}
        """

    def knobs(stage: str = "joint") -> str:
        stratified = ", stratified = true" if stage in STRATIFIED.get(method, ()) else ""
        pruner = (f"startup_trials = {mode.startup}, warmup_epochs = {mode.warmup}"
                  if method not in HYPERBAND_STAGES else
                  'type = "hyperband", min_epochs = 1, reduction_factor = 3')
        return (f"pruner = {{ {pruner} }}\n"
                f"sampler = {{ startup_trials = {mode.startup}{stratified} }}\n")

    stages = stage_params(mode)
    if joint:
        trials = math.ceil(mode.budget / 2)  # a loop ends at the epoch budget, never by this
        rows = "\n".join(textwrap.dedent(p) for _, p in stages)
        return (textwrap.dedent(head) + f'[[stage]]\nname = "joint"\ntrials = {trials}\n'
                f"epochs = {mode.epochs}\n{knobs()}[stage.params]\n{rows}\n")
    text = textwrap.dedent(head)
    if method in ("coupled", "ordered", "regtwice", "ordreg", "centred", "regpat", "strat",
                  "stratopt", "prior", "priorhb"):
        stages, shares = {"coupled": (coupled_params(mode), COUPLED),
                          "ordered": (ordered_params(mode), ORDERED),
                          "regtwice": (ordered_params(mode, "regularization"), REGTWICE),
                          "ordreg": (ordered_params(mode, "regularization"), ORDERED),
                          "centred": (ordered_params(mode, "regularization"), REGTWICE),
                          "regpat": (ordered_params(mode, "regularization"), REGTWICE),
                          "strat": (ordered_params(mode, "regularization"), REGTWICE),
                          "stratopt": (ordered_params(mode, "regularization"), REGTWICE),
                          "prior": (ordered_params(mode, "regularization"), REGTWICE),
                          "priorhb": (ordered_params(mode, "regularization"), REGTWICE),
                          }[method]
        if method == "centred":  # [fixed] is the head's last table
            text += "".join(f"{key} = {value:.6g}\n" for key, value in centres(stages).items())
        hyperband = method in HYPERBAND_STAGES
        budgets = stage_trials(mode, 1, stages=stages, shares=shares,
                               least=1 if hyperband else None,
                               per_trial=HYPERBAND_PER_TRIAL if hyperband else None)
        for index, (name, params) in enumerate(stages):
            extra = "warm_start = true\n" if index == len(stages) - 1 else ""
            if method == "regpat" and name in REGPAT:
                extra += f"patience = {REGPAT[name]}\n"
            if method in FROM_PRIOR and index == 0:
                if mode.dataset not in PRIOR:
                    raise SystemExit(f"--methods {method}: no earlier study for {mode.dataset}"
                                     f" (only {', '.join(PRIOR)})")
                point = ", ".join(f"{k} = {v}" for k, v in PRIOR[mode.dataset].items())
                extra += f"start = [{{ {point} }}]\n"
            text += (f'\n[[stage]]\nname = "{name}"\ntrials = {budgets[index]}\n'
                     f"epochs = {mode.epochs}\n{extra}{knobs(name)}[stage.params]\n"
                     f"{textwrap.dedent(params)}\n")
        return text
    screen = SCREEN if method == "screened" else 0.0
    budgets = stage_trials(mode, cycles, screen)
    if screen:  # a first stage over every stage's params (search/space/spec.py)
        text += f"\n[screen]\ntrials = {budgets.pop(0)}\nepochs = {mode.epochs}\n{knobs()}"
    for index, (name, params) in enumerate(stages * cycles):
        n = index // len(stages) + 1  # the pass
        label, warm = (name, "") if n == 1 else (f"{name}-{n}", "warm_start = true\n")
        last = index == len(budgets) - 1
        if method == "patience" and not last:
            warm += f"patience = {PATIENCE[name]}\n"
        text += (f'\n[[stage]]\nname = "{label}"\ntrials = {budgets[index]}\n'
                 f"epochs = {mode.epochs}\n{warm}{knobs(label)}[stage.params]\n"
                 f"{textwrap.dedent(params)}\n")
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


def start_point(mode: Mode, pipeline: Any, stage: Any) -> dict[str, Any]:
    """Every parameter of the joint `stage` for the started baselines' first trial: PRIOR's
    optimizer values, and for the rest the value `prior`'s first stage trains with, the space
    file's [fixed] value or the trainer's default (resnet20 at the larger width, no SE, no label
    smoothing, weight decay 5e-4, no dropout), so that it is the very configuration `prior`
    trains first."""
    from search.space.spec import base_config
    from trainer.config import TrainConfig, with_overrides

    if mode.dataset not in PRIOR:
        raise SystemExit(f"a started baseline: no earlier study for {mode.dataset}"
                         f" (only {', '.join(PRIOR)})")
    default = with_overrides(TrainConfig(), base_config(pipeline, stage, {}))
    return {name: PRIOR[mode.dataset].get(name, getattr(default, name))
            for name in stage.params}


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
    kind = STARTED.get(method, method)
    if kind == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    elif kind == "hyperband":
        # Epochs are the resource, as with `pruner = { type = "hyperband" }` in a space file.
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=stage.sampler.startup_trials, multivariate=True, group=True,
            constant_liar=True, seed=seed)
        pruner = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=mode.epochs,
                                                reduction_factor=3)
    else:
        # The worker's settings (search/runtime/worker.py), with the space file's startup counts.
        sampler = optuna.samplers.TPESampler(
            n_startup_trials=stage.sampler.startup_trials, multivariate=True, group=True,
            constant_liar=True, seed=seed)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=stage.pruner.startup_trials,
                                             n_warmup_steps=stage.pruner.warmup_epochs)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    if method in STARTED:
        study.enqueue_trial(start_point(mode, pipeline, stage))
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


def run_staged(method: str, seed: int, space: Path, work: Path, url: str, budget: int) -> Run:
    from search.db import registry
    from search.db.storage import open_storage

    started = time.monotonic()
    log = work / f"{method}-s{seed}.log"
    db = Path(url.removeprefix("sqlite:///"))
    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)  # left by a run that was killed
    # The database is new (removed above), so the name need not be unique; fixed, it fixes the
    # design of a stratified start-up (search/runtime/startup.py), and a run repeats by seed.
    study = f"eff-{method}-s{seed}"
    # Our worker seeds TPE from its worker id, the database's row number. Each run has a database
    # of its own, in which seed s's worker gets id s + 1 (rows registered here first), so a run's
    # figures do not depend on which runs a work folder already held.
    storage = open_storage(url, create_schema=True)
    registry.create_schema(storage.engine)
    for _ in range(seed):
        placeholder = registry.register_worker(storage.engine, "placeholder", "cpu")
        registry.touch_worker(storage.engine, placeholder, state="done")
    storage.engine.dispose()
    stopped = False
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "run", "--space", str(space),
             "--study", study, "--storage", url, "--workers", "1", "--threads", "1",
             "--device", "cpu", "--artifacts", str(work / "artifacts")],
            cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        # The run is cut at the epoch budget, so once that many epochs are in the database the
        # rest (the last stage's spare trials) would be trained for nothing: stop the service
        # (SIGTERM: the worker hands its trial back, keeping the epochs it ran).
        while proc.poll() is None:
            time.sleep(10)
            if not stopped and trained(method, seed, study, url) >= budget:
                proc.terminate()
                stopped = True
        code = proc.wait()
    if code != 0 and not stopped:
        raise RuntimeError(f"hpo run for seed {seed} exited {code}; see {log}")
    run = read_staged(method, seed, study, url)
    run.wall = time.monotonic() - started
    if stopped:
        run.note = f"stopped at the budget; {run.note}"
    return run


def trained(method: str, seed: int, study: str, url: str) -> int:
    """Epochs the service has recorded so far (0 before its pipeline exists)."""
    try:
        return len(read_staged(method, seed, study, url).curve)
    except Exception:  # no pipeline yet, or a read that met a write: ask again next time
        return 0


def read_staged(method: str, seed: int, name: str, url: str) -> Run:
    import optuna

    from search.db import pipeline
    from search.db.storage import open_storage

    storage = open_storage(url)
    try:
        pipe = pipeline.load(storage, name)
        trials: list[tuple[Any, str]] = []
        for stage in pipe.stages:
            study = pipeline.load_stage_study(storage, name, stage)
            trials += [(t, stage.name) for t in study.get_trials(deepcopy=False)
                       if t.datetime_start is not None]
    finally:
        storage.engine.dispose()  # read every 10 s while the service runs
    trials.sort(key=lambda ts: ts[0].datetime_start)  # one worker: the order they were trained
    run = Run(method, seed)
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
# Orchestration: runs as subprocesses, `--jobs` at a time, in seed order (every method's seed 0,
# then seed 1, ...), so that a benchmark stopped part way leaves whole seeds to compare.


def finished(out: Path, mode: Mode) -> Run | None:
    """The run stored in `out` by an earlier invocation, if it trained what this one would: the
    same RUN_FIELDS and the same generated space file (which holds the stage trial budgets)."""
    try:
        stored = json.loads(out.read_text())
        run = Run(**stored["run"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    wanted = json.loads(json.dumps(asdict(mode)))
    if any(stored.get("mode", {}).get(k) != wanted[k] for k in RUN_FIELDS):
        return None
    if stored.get("space") != space_text(mode, run.seed, method=run.method):
        return None
    return run


def run_all(mode: Mode, work: Path, jobs: int, methods: tuple[str, ...]) -> list[Run]:
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
        # Every run has a database and a study of its own (`url` below), so runs of one method
        # go side by side like any others.
        for item in list(todo):
            if len(running) >= jobs:
                break
            method, seed = item
            todo.remove(item)
            out = work / f"{method}-s{seed}.json"
            url = f"sqlite:///{work / f'{method}-s{seed}.db'}"
            cmd = [sys.executable, __file__, "--role", method, "--seed", str(seed),
                   "--out", str(out), "--work", str(work), "--url", url,
                   "--mode", json.dumps(asdict(mode))]
            log = (work / f"{method}-s{seed}.json.log").open("w")
            running.append((method, seed, subprocess.Popen(
                cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT), out))
        time.sleep(0.5)
    return runs


def role(args: argparse.Namespace, mode: Mode) -> int:
    space = args.work / f"{args.role}-s{args.seed}.toml"
    space.write_text(space_text(mode, args.seed, method=args.role))
    if args.role in SERVICE:
        run = run_staged(args.role, args.seed, space, args.work, args.url, mode.budget)
    else:
        run = run_joint(args.role, args.seed, mode, space)
    # Written whole, then renamed: a kill leaves no half file for a later invocation to read.
    part = args.out.with_name(args.out.name + ".part")
    part.write_text(json.dumps({"mode": asdict(mode), "space": space.read_text(),
                                "run": asdict(run)}) + "\n")
    part.replace(args.out)
    return 0


# --------------------------------------------------------------------------------------------
# Report.


# The fractions of the budget at which the summary table reads each method's best so far.
FRACTIONS = (0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Efficiency:
    """One method's line of a task's summary table."""

    method: str
    best: tuple[tuple[float, float], ...]  # (mean, std) over seeds of the best at each FRACTION
    to_random: float | None  # mean epochs to random's final mean best; a miss counts as budget
    reached: int  # seeds that reached it within the budget
    seeds: int
    ratio: float | None  # to_random over random's own to_random
    # The same goal read off the mean curve (over seeds) of the best so far, the usual reading
    # of "time to random search's final result": the first epoch at which the mean reaches it,
    # and that over the epoch at which random's own mean curve does (its last rise).
    curve_to_random: int | None = None
    curve_ratio: float | None = None


def mean_best_curve(rs: Sequence[Run], budget: int) -> list[float]:
    """The best so far after each epoch 1..budget, averaged over the runs; a run that trained
    fewer epochs keeps its last best."""
    curves = []
    for r in rs:
        best, out = 0.0, []
        for acc in r.cut(budget):
            best = max(best, acc)
            out.append(best)
        curves.append(out + [best] * (budget - len(out)))
    return [statistics.mean(column) for column in zip(*curves, strict=True)]


def first_at_least(curve: Sequence[float], goal: float) -> int | None:
    # A tolerance: the goal is itself a mean, and float sums of the same values in
    # another order may differ in the last bit.
    return next((n for n, v in enumerate(curve, start=1) if v >= goal - 1e-12), None)


def efficiency(runs: Sequence[Run], methods: Sequence[str], budget: int,
               ) -> tuple[float | None, list[Efficiency]]:
    """Random search's final mean best (None without random runs) and each method's line: the
    issue's criterion is a method reaching that figure in a third of random's epochs or fewer.
    Random's own epochs to it are a mean over its seeds, those below the mean counted as the
    whole budget, so a ratio is only as good as its `reached` count."""
    randoms = [r for r in runs if r.method == "random"]
    goal = statistics.mean(r.best(budget) for r in randoms) if randoms else None

    def to_goal(rs: list[Run]) -> tuple[float | None, int]:
        if goal is None or not rs:
            return None, 0
        hits = [r.to_target(budget, goal) for r in rs]
        return statistics.mean(h or budget for h in hits), sum(h is not None for h in hits)

    base, _ = to_goal(randoms)
    curve_base = (first_at_least(mean_best_curve(randoms, budget), goal)
                  if goal is not None else None)
    lines = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        best = []
        for f in FRACTIONS:
            values = [r.best(round(budget * f)) for r in mine]
            best.append((statistics.mean(values),
                         statistics.stdev(values) if len(values) > 1 else 0.0))
        epochs, reached = to_goal(mine)
        ratio = epochs / base if epochs is not None and base else None
        at = first_at_least(mean_best_curve(mine, budget), goal) if goal is not None else None
        curve_ratio = at / curve_base if at is not None and curve_base else None
        lines.append(Efficiency(method, tuple(best), epochs, reached, len(mine), ratio,
                                at, curve_ratio))
    return goal, lines


def trial_bests(run: Run, epochs: int) -> list[float]:
    """Each trial's best val_acc, for a run whose trials all train `epochs` (random search: no
    pruning); a last trial cut by the budget is left out."""
    curve = run.curve
    return [max(curve[i:i + epochs]) for i in range(0, len(curve) - epochs + 1, epochs)]


def expected_best(values: Sequence[float], k: int) -> float:
    """The expected best of `k` trials drawn at random (with replacement) from `values`: with
    v_1 <= ... <= v_n, the best is v_i with probability (i/n)^k - ((i-1)/n)^k."""
    ordered, n = sorted(values), len(values)
    return sum(v * ((i / n) ** k - ((i - 1) / n) ** k) for i, v in enumerate(ordered, start=1))


def random_expectation(mode: Mode, runs: Sequence[Run]) -> list[str]:
    """Random search's best at each FRACTION as the seeds drew it, beside what it is expected to
    be: every random trial of every seed pooled, k trials drawn from the pool. Its trials are
    independent draws, so the gap is the luck of the seeds' draws; the joint methods share a
    seed's sampler, so their start-up trials (the first `startup`) are the same draws."""
    randoms = [r for r in runs if r.method == "random"]
    pool = [v for r in randoms for v in trial_bests(r, mode.epochs)]
    if not pool:
        return []
    cells = []
    for f in (0.25, *FRACTIONS):
        k = round(mode.budget * f) // mode.epochs
        if k == 0:  # not one whole trial yet
            continue
        seen = statistics.mean(r.best(k * mode.epochs) for r in randoms)
        cells.append(f"{f:.0%}: {seen:.4f} drawn, {expected_best(pool, k):.4f} expected")
    first = [statistics.mean(trial_bests(r, mode.epochs)[:mode.startup]) for r in randoms]
    return [f"random search, {len(randoms)} seeds, {len(pool)} trials pooled: best at " +
            "; ".join(cells),
            f"  its first {mode.startup} trials (the joint methods' start-up) averaged"
            f" {statistics.mean(first):.4f}, all {len(pool)} {statistics.mean(pool):.4f}"]


def efficiency_table(mode: Mode, runs: Sequence[Run], methods: Sequence[str]) -> list[str]:
    """The summary table of one task, as lines of text."""
    budget = mode.budget
    goal, lines = efficiency(runs, methods, budget)
    head = "".join(f"{f'best at {f:.0%} ({round(budget * f)})':>22}" for f in FRACTIONS)
    out = [f"summary, {mode.dataset}: best val_acc so far (mean ± std over seeds), and epochs to"
           + (f" random's final mean best {goal:.4f}" if goal is not None else
              " random's final mean best (no random runs)")
           + f" (a seed that never reached it counted as {budget}):",
           f"  {'method':<27}{head}{'epochs to random':>20}{'x random':>10}"
           f"{'mean curve':>12}{'x random':>10}"]
    for e in lines:
        cells = "".join(f"{f'{m:.4f} ± {sd:.4f}':>22}" for m, sd in e.best)
        to = (f"{e.to_random:.0f} ({e.reached}/{e.seeds})" if e.to_random is not None
              else "-")
        ratio = f"{e.ratio:.2f}" if e.ratio is not None else "-"
        at = str(e.curve_to_random) if e.curve_to_random is not None else f">{budget}"
        curve_ratio = f"{e.curve_ratio:.2f}" if e.curve_ratio is not None else "-"
        out.append(f"  {LABELS[e.method]:<27}{cells}{to:>20}{ratio:>10}{at:>12}"
                   f"{curve_ratio:>10}")
    out.append("  (mean curve: the first epoch at which the mean over seeds of the best so far"
               " reaches random's final mean best; random's own is its last rise)")
    return out


def stage_gains(run: Run, budget: int) -> list[tuple[str, int, int, float, float]]:
    """Each stage of a service run within the budget: (name, first epoch, last epoch, its best
    val_acc, how much it raised the best of the stages before it)."""
    out, best_so_far = [], 0.0
    for st in run.stages:
        first, last = st["first"], min(st["last"], budget)
        best = max(run.curve[first - 1:last], default=0.0) if first <= budget else 0.0
        out.append((st["name"], first, last, best, max(0.0, best - best_so_far)))
        best_so_far = max(best_so_far, best)
    return out


def paired_table(mode: Mode, runs: Sequence[Run], methods: Sequence[str],
                 ours: str) -> list[str]:
    """`ours` against each other method, seed by seed: the mean and standard deviation of the
    difference in best so far at each FRACTION, and in how many seeds ours was at least as
    good. A seed fixes the task's data and every trial's training seed, so the pairs share
    them and the difference is less noisy than the two means apart."""
    budget = mode.budget
    mine = {r.seed: r for r in runs if r.method == ours}
    head = "".join(f"{f'at {f:.0%}':>24}" for f in FRACTIONS)
    out = [f"paired, {mode.dataset}: {LABELS[ours]} minus each method, same seeds (mean ± std"
           " of the difference; seeds where ours >= theirs):", f"  {'method':<27}{head}"]
    for method in methods:
        theirs = {r.seed: r for r in runs if r.method == method}
        seeds = sorted(set(mine) & set(theirs))
        if method == ours or not seeds:
            continue
        cells = []
        for f in FRACTIONS:
            cut = round(budget * f)
            diffs = [mine[s].best(cut) - theirs[s].best(cut) for s in seeds]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            wins = sum(d >= 0 for d in diffs)
            cells.append(f"{statistics.mean(diffs):+.4f} ± {sd:.4f} ({wins}/{len(diffs)})")
        out.append(f"  {LABELS[method]:<27}" + "".join(f"{c:>24}" for c in cells))
    return out


BASELINES = ("random", "tpe", "hyperband", *STARTED)
# The true lead over the best baseline that criterion_power asks about: about the differences
# left between the staged methods and joint TPE (BENCHMARKS.md).
POWER_DELTA = 0.005


def _best_by_fraction(mode: Mode, runs: Sequence[Run], ours: str, bases: Sequence[str]
                      ) -> tuple[list[int], dict[str, Any]]:
    """The seeds that `ours` and every baseline in `bases` ran, and for each of those methods
    the best so far at each FRACTION of the budget: an array [fraction, seed]."""
    import numpy as np

    by = {m: {r.seed: r for r in runs if r.method == m} for m in (ours, *bases)}
    seeds = sorted(set(by[ours]).intersection(*(by[b] for b in bases)))
    return seeds, {m: np.array([[by[m][s].best(round(mode.budget * f)) for s in seeds]
                                for f in FRACTIONS]) for m in by}


def criterion_table(mode: Mode, runs: Sequence[Run], methods: Sequence[str],
                    draws: int = 10_000) -> list[str]:
    """The issue's criterion for each method of ours: its mean best at each FRACTION against
    the best baseline's there (the shortfall), and how sure that verdict is: the share of
    `draws` resamplings of the seeds (with replacement, the same seeds for every method, so
    each method keeps its pairing with the others) in which its mean is at least every
    baseline's, at that fraction and at all of them at once. A share near 0.5 means the seeds
    measured cannot tell; only the seeds that every one of these methods ran are used."""
    import numpy as np

    bases = [m for m in BASELINES if m in methods]
    if not bases:
        return []
    rng = np.random.default_rng(0)
    out = [f"criterion, {mode.dataset}: mean best minus the best baseline's ({', '.join(bases)})"
           " at each fraction; in brackets the share of seed resamplings in which it is >= every"
           " baseline's; last, the share in which all three hold:"]
    for ours in [m for m in methods if m in SERVICE]:
        seeds, best = _best_by_fraction(mode, runs, ours, bases)
        if len(seeds) < 2:
            continue
        picks = rng.integers(0, len(seeds), size=(draws, len(seeds)))
        mine = best[ours][:, picks].mean(axis=2)  # (fraction, draw)
        top = np.max([best[b][:, picks].mean(axis=2) for b in bases], axis=0)
        holds = mine >= top - 1e-12
        gaps = best[ours].mean(axis=1) - np.max([best[b].mean(axis=1) for b in bases], axis=0)
        cells = [f"{g:+.4f} ({h:.2f})" for g, h in zip(gaps, holds.mean(axis=1), strict=True)]
        out.append(f"  {LABELS[ours]:<27}" + "".join(f"{c:>18}" for c in cells)
                   + f"   all {holds.all(axis=0).mean():.2f}  ({len(seeds)} seeds)")
    return out


def criterion_power(mode: Mode, runs: Sequence[Run], ours: str, delta: float,
                    counts: Sequence[int], draws: int = 4000) -> list[float] | None:
    """How often the criterion would hold for a method truly `delta` ahead of the best baseline
    at every fraction, with the spread over seeds measured: `ours`' per-seed values shifted so
    that their mean is the best baseline's mean plus `delta` at each fraction, then for each
    count in `counts` the share of `draws` resamplings of that many seeds (the same seeds for
    every method) in which its mean is at least every baseline's at all three fractions. None
    without a baseline or two seeds that it and every baseline share."""
    import numpy as np

    bases = [b for b in BASELINES if any(r.method == b for r in runs)]
    seeds, best = _best_by_fraction(mode, runs, ours, bases)
    if not bases or len(seeds) < 2:
        return None
    top = np.max([best[b].mean(axis=1) for b in bases], axis=0)
    shifted = best[ours] - best[ours].mean(axis=1, keepdims=True) + (top + delta)[:, None]
    rng = np.random.default_rng(0)
    shares = []
    for count in counts:
        picks = rng.integers(0, len(seeds), size=(draws, count))
        theirs = np.max([best[b][:, picks].mean(axis=2) for b in bases], axis=0)
        shares.append(float((shifted[:, picks].mean(axis=2) >= theirs - 1e-12).all(axis=0).mean()))
    return shares


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
    print(f"\nsearch efficiency, {today}: {mode.dataset}, budget {budget} epochs per run,"
          f" {mode.epochs} epochs per trial, {mode.seeds} seeds, widths {mode.widths},"
          f" target val_acc {mode.target}; sampler/pruner startup {mode.startup},"
          f" pruning from epoch {mode.warmup}")
    print(f"{os.cpu_count()} cores, 1 thread per run; optuna {optuna.__version__},"
          f" torch {torch.__version__}; load average (1 min) {load_start:.2f} at start,"
          f" {os.getloadavg()[0]:.2f} at end; {wall / 60:.1f} min in all")
    by_method = {m: sorted((r for r in runs if r.method == m), key=lambda r: r.seed)
                 for m in methods}
    print(f"\n{'method':<27}{'best val_acc':>18}{'epochs to target':>33}{'epochs':>8}"
          f"{'trials':>8}{'pruned':>8}{'wall s':>8}")
    for method, mine in by_method.items():
        hits = [r.to_target(budget, mode.target) for r in mine]
        reached = [h for h in hits if h is not None]
        text = (f"{statistics.mean(reached):.0f} (range {min(reached)}-{max(reached)})"
                if reached else "-")
        text += f", {len(reached)}/{len(hits)} reached"
        print(f"{LABELS[method]:<27}{mean_std([r.best(budget) for r in mine]):>18}{text:>33}"
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
    for r in [r for m in SERVICE for r in by_method.get(m, [])]:
        parts = []
        for st, (name, first, last, best, gain) in zip(r.stages, stage_gains(r, budget),
                                                        strict=True):
            parts.append(f"{name} not reached" if first > budget else
                         f"{name} epochs {first}-{last} ({st['trials']} trials), best"
                         f" {best:.4f} (+{gain:.4f})")
        print(f"  {r.method} s{r.seed} ({r.note}): " + "; ".join(parts))
    for method in SERVICE:
        raised: dict[str, list[int]] = {}
        for r in by_method.get(method, []):
            for name, first, _, _, gain in stage_gains(r, budget):
                if first <= budget:
                    raised.setdefault(name.split("-")[0], []).append(gain > 0)
        if raised:
            print(f"  {method}: stages that raised the best so far: " + ", ".join(
                f"{name} {sum(v)}/{len(v)}" for name, v in raised.items()))
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
    print("\n" + "\n".join(efficiency_table(mode, runs, methods)))
    print("\n".join(random_expectation(mode, runs)))
    for ours in SERVICE:
        if ours in by_method:
            print("\n" + "\n".join(paired_table(mode, runs, methods, ours)))
    if criterion := criterion_table(mode, runs, methods):
        print("\n" + "\n".join(criterion))
        # What these seeds can decide: a method truly POWER_DELTA ahead everywhere, with the
        # spread measured, meets all three cells only this often.
        for ours in [m for m in methods if m in SERVICE]:
            n = len({r.seed for r in runs if r.method == ours})
            shares = criterion_power(mode, runs, ours, POWER_DELTA, (n, 2 * n, 4 * n))
            if shares:
                print(f"  if {LABELS[ours]} were {POWER_DELTA} ahead of the best baseline at every"
                      f" fraction, with its spread over seeds: all three would hold in "
                      + ", ".join(f"{share:.2f} at {k * n} seeds"
                                  for k, share in zip((1, 2, 4), shares, strict=True)))


def parse_mode(text: str) -> Mode:
    fields = json.loads(text)
    return Mode(**{k: tuple(v) if k in TUPLE_FIELDS else v for k, v in fields.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = MODES["digits-hard"]["quick"]
    p.add_argument("--quick", action="store_true",
                   help=f"each task's short mode (hard tasks: budget {quick.budget} epochs,"
                        f" {quick.epochs} per trial, {quick.seeds} seeds; ~10 minutes a task)")
    p.add_argument("--task", default="digits",
                   help=f"comma-separated, run one after another; from {', '.join(TASKS)}"
                        " (default digits)")
    p.add_argument("--seeds", type=int, help="override the mode's number of seeds")
    p.add_argument("--budget", type=int, help="override the mode's epochs per run")
    p.add_argument("--target", type=float, help="override the mode's target val_acc")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, 1 thread each (default 2)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (default"
                        f" {','.join(DEFAULT_METHODS)})")
    p.add_argument("--workdir", type=Path, help="keep files here, a folder per task (default: a"
                                                " temporary folder)")
    p.add_argument("--role", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role:
        return role(args, parse_mode(args.mode))

    tasks = tuple(t for t in args.task.split(",") if t)
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {METHODS}")
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        p.error(f"--task: unknown {', '.join(sorted(unknown))}; choose from {TASKS}")
    overrides = {k: v for k, v in (("seeds", args.seeds), ("budget", args.budget),
                                   ("target", args.target)) if v is not None}
    root = args.workdir or Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    try:
        for task in tasks:
            mode = Mode(**{**asdict(MODES[task]["quick" if args.quick else "full"]),
                           **overrides})
            # Quick and full runs of a task in folders of their own: a committed full-mode
            # folder (bench/results/) is never overwritten by a quick run.
            work = root / f"{task}-{'quick' if args.quick else 'full'}"
            work.mkdir(parents=True, exist_ok=True)
            load_start = os.getloadavg()[0]
            started = time.monotonic()
            print(f"{task}: {len(methods)} methods x {mode.seeds} seeds, {args.jobs} at a time,"
                  f" in {work}", flush=True)
            runs = run_all(mode, work, args.jobs, methods)
            report(mode, runs, methods, time.monotonic() - started, load_start)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
