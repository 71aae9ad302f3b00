"""Search-space files: a staged pipeline read from TOML and checked whole before any database use.

A file names a dataset, a metric, fields fixed for every stage, and stages run in order, each
with a trial budget, epochs, pruner and sampler settings, fixed fields and searched fields.
`load_space` never writes anything; a bad file raises one `SpaceError` naming the file, the stage
and the field. `Pipeline.to_json` is what gets stored with a study, and its digest is how a study
refuses to be re-created from a different file.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SpaceError, the param types and `distribution` are this module's API too (`as`: re-export).
from search.space.params import CategoricalParam as CategoricalParam
from search.space.params import FloatParam as FloatParam
from search.space.params import IntParam as IntParam
from search.space.params import (
    Param,
    ParamError,
    check_config,
    check_field,
    check_values,
    count,
    counts,
    field_value,
    fixed_table,
    in_range,
    key_text,
    no_unknown_keys,
    param_table,
    parse_param,
    show,
    values_to_check,
)
from search.space.params import SpaceError as SpaceError
from search.space.params import distribution as distribution
from trainer.config import TrainConfig, with_overrides
from trainer.contract import METRIC_DIRECTIONS, Direction
from trainer.sources import check_readable

MAX_BYTES = 1 << 20  # a space file is a few KiB; anything near this is a mistake, not a space
# The metrics a pipeline may optimise, with their direction: the trainer's, which keeps the
# best epoch by the same metric (`best_metric`, set from the pipeline's metric).
METRICS: dict[str, Direction] = METRIC_DIRECTIONS
TOP_KEYS = ("dataset", "metric", "fixed", "stage", "cycles", "joint", "screen", "ties",
            "confirm")
# TrainConfig fields the worker sets for each trial, whatever a space file says: where and how a
# trial runs, not what it computes (so they are left out of a trial's recorded configuration).
WORKER_OWNED = ("checkpoint_dir", "device", "resume", "fault", "test")
STAGE_KEYS = ("name", "trials", "epochs", "pruner", "sampler", "teacher", "fixed", "params",
              "warm_start", "patience", "start")
CONFIRM_KEYS = ("top", "seeds", "epochs")
CONFIRM_STAGE = "confirm"  # the name of the confirmation stage a `confirm` table adds
# The `joint` table: a stage's keys but the ones the joint stage derives (name, params) or cannot
# have (teacher: it searches kd_alpha only with one).
JOINT_KEYS = ("trials", "epochs", "pruner", "sampler", "fixed", "warm_start", "patience")
JOINT = "joint"  # the name of the joint stage
# The `screen` table: a first stage over every stage's params, so the coordinate stages refine a
# base found with all groups at once rather than the defaults (on the hard tasks it did not beat
# one pass without it: BENCHMARKS.md, so no shipped file uses it). Nothing runs before it, so it
# has nothing to warm-start from, and no teacher: it leaves out the distillation params, which
# stay at their base (no distillation) until the stage that has one.
SCREEN_KEYS = ("trials", "epochs", "pruner", "sampler", "fixed", "patience")
SCREEN = "screen"  # the name of the screening stage
DISTILLATION = ("kd_alpha", "kd_temperature")
MAX_CYCLES = 5  # passes over the stages; more is a joint search done slowly
# Which of equal-valued complete trials is best: the earlier one (stage, then trial number), the
# later one, or the one with the lower recorded validation loss (then the earlier).
TIES = ("earlier", "later", "val_loss")
# Stage names become part of Optuna study names (`<study>/<stage>`) and of folder names.
_STAGE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class Pruner:
    """Which of Optuna's pruners stops a stage's poor trials early, epochs being the resource.

    `median` (the default): MedianPruner; warmup_epochs >= the stage's epochs turns it off.
    `hyperband` and `successive_halving`: Optuna's HyperbandPruner and SuccessiveHalvingPruner
    from `min_epochs` up to the stage's epochs, keeping 1/`reduction_factor` at each rung.
    `none`: every trial runs all its epochs."""

    type: str = "median"
    startup_trials: int = 5  # median: n_startup_trials, finished trials before any pruning
    warmup_epochs: int = 2  # median: n_warmup_steps, epochs a trial always runs
    min_epochs: int = 1  # hyperband, successive_halving: min_resource
    reduction_factor: int = 3  # hyperband, successive_halving: at least 2

    def table(self) -> dict[str, Any]:
        """The keys this type uses, as a space file writes them. A median pruner is written
        without its type, as before pruner types existed, so stored pipelines keep their
        digest."""
        keys = PRUNER_KEYS[self.type]
        values = {key: getattr(self, key) for key in keys}
        return values if self.type == "median" else {"type": self.type, **values}


PRUNER_KEYS = {
    "median": ("startup_trials", "warmup_epochs"),
    "hyperband": ("min_epochs", "reduction_factor"),
    "successive_halving": ("min_epochs", "reduction_factor"),
    "none": (),
}


@dataclass(frozen=True)
class Sampler:
    """Optuna's TPESampler. `stratified`: its start-up trials are a Latin hypercube over the
    stage's parameters (search/runtime/startup.py) instead of independent random draws, so
    that every choice of a categorical with no more choices than start-up trials is tried
    before TPE takes over."""

    startup_trials: int = 10  # n_startup_trials: random trials before TPE takes over
    stratified: bool = False

    def table(self) -> dict[str, Any]:
        """As a space file writes it; `stratified` only when set, so that the stored
        pipelines of older files keep their digest."""
        return {"startup_trials": self.startup_trials} | (
            {"stratified": True} if self.stratified else {})


_DEFAULT_PRUNER = {k: v for k, v in dataclasses.asdict(Pruner()).items() if k != "type"}
_DEFAULT_SAMPLER = {"startup_trials": Sampler.startup_trials}


@dataclass(frozen=True)
class Confirm:
    """The confirmation stage: the `top` best distinct configurations of the stages before it,
    each trained again with `seeds` new seeds (the trainer's `seed` + 1 .. + seeds) for `epochs`
    (default: the last stage's). The winner is the best mean over its seeds."""

    top: int = 3
    seeds: int = 3
    epochs: int | None = None


@dataclass(frozen=True)
class Stage:
    """One Optuna study of the pipeline. With no params it still runs `trials` trials of the
    carried config (e.g. a final, longer training of the winner)."""

    name: str
    trials: int  # budget of finished (complete + pruned) trials
    epochs: int
    pruner: Pruner = Pruner()
    sampler: Sampler = Sampler()
    params: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    teacher: str | None = None  # name of an earlier stage whose best trial is the teacher
    # The confirmation stage (`Pipeline.confirm`): its trials are the queued re-runs only.
    confirms: Confirm | None = None
    # Seed the stage's TPE with the complete trials of earlier stages that share its base
    # (search/db/pipeline.py `warm_trials`); nothing is written to the stage's study.
    warm_start: bool = False
    # Close the stage once its last `patience` finished trials did not improve its best, passing
    # the unspent budget on to the next stage (search/db/budget.py). None: spend the budget.
    patience: int | None = None
    # Configurations the stage trains first, queued when the study is created: a prior, such as
    # an earlier study's winner or a published recipe. Each holds some or all of the stage's
    # params (the sampler fills in the rest) and counts as one of its trials.
    start: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Pipeline:
    """A whole space file, checked; stages run in order. `stages` is the expanded list: the
    file's stages, then `cycles - 1` more passes over them (`<name>-<k>`), then the joint stage
    when the file has a `joint` table; the screening stage first when it has a `screen` table."""

    dataset: str
    metric: str
    fixed: dict[str, Any]
    stages: tuple[Stage, ...]  # the confirmation stage, if any, last
    cycles: int = 1
    joint: bool = False  # the last stage before the confirmation stage is the joint stage
    screen: bool = False  # the first stage is the screening stage
    ties: str = "earlier"  # one of TIES
    confirm: Confirm | None = None

    @property
    def direction(self) -> Direction:
        """Optuna's study direction for the metric: "maximize" or "minimize"."""
        return METRICS[self.metric]

    def stage(self, name: str) -> Stage:
        """The stage called `name`; KeyError if there is none."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_json(self) -> str:
        """Canonical JSON in the file's own shape: equal pipelines give equal text."""
        return json.dumps(_to_data(self), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> Pipeline:
        """The pipeline `to_json` wrote, checked again against the current TrainConfig."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise SpaceError(f"stored pipeline: not valid JSON: {err}") from None
        return parse_space(data, "stored pipeline")

    def digest(self) -> str:
        """sha256 of `to_json()`, hex."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def base_config(pipeline: Pipeline, stage: Stage, carried: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig overrides for a trial of `stage` before its sampled params.

    `carried` holds the best sampled params of the earlier stages; the stage's own fixed fields
    win over them, and the pipeline's fixed fields lose to them.
    """
    return {
        "dataset": pipeline.dataset,
        **pipeline.fixed,
        **carried,
        **stage.fixed,
        "epochs": stage.epochs,
        "best_metric": pipeline.metric,
    }


def check_data(pipeline: Pipeline) -> None:
    """Refuse a pipeline whose dataset cannot be read here (an ImageFolder that is not there or
    has fewer than two class folders with images, CIFAR's files absent without `download`, a
    crop padding the images do not allow), so a fleet does not start on it. Reads folder
    listings only; raises trainer's DataUnavailable (a ConfigError) naming the problem."""
    for stage in pipeline.stages:
        base = base_config(pipeline, stage, {})
        if stage.teacher:  # as in `check`: a fixed kd_alpha > 0 needs its teacher set
            base["teacher"] = f"best:{stage.teacher}"
        check_readable(with_overrides(TrainConfig(), base))


def load_space(path: str | Path) -> Pipeline:
    """Read, parse and check a space file; raises SpaceError and never writes anything."""
    source = str(path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size <= MAX_BYTES:
                raw = file.read(MAX_BYTES + 1)  # +1: a file that grew after fstat is still caught
    except FileNotFoundError:
        raise SpaceError(f"{source}: no such file") from None
    except OSError as err:
        raise SpaceError(f"{source}: cannot read it: {err.strerror or err}") from None
    if size > MAX_BYTES or len(raw) > MAX_BYTES:
        raise SpaceError(
            f"{source}: {max(size, MAX_BYTES + 1)} bytes is too large for a space file"
            f" (at most 1 MiB, {MAX_BYTES} bytes); is this the right file?"
        )
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SpaceError(f"{source}: not UTF-8 text (bad byte at offset {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise SpaceError(f"{source}: not valid TOML: {err}") from None
    except RecursionError:
        raise SpaceError(f"{source}: not valid TOML: nested too deeply") from None
    return parse_space(data, source)


def parse_space(data: dict, source: str) -> Pipeline:
    """Check the parsed contents of a space file (`source` names it in messages)."""
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a table at the top, got {show(data)}")
    no_unknown_keys(data, TOP_KEYS, f"{source}: ")
    if "dataset" not in data:
        raise SpaceError(f'{source}: dataset: missing; e.g. dataset = "digits"')
    try:
        dataset = field_value("dataset", data["dataset"])
    except ParamError as err:
        raise SpaceError(f"{source}: dataset: {err}") from None
    metric = data.get("metric", "val_acc")
    if not isinstance(metric, str) or metric not in METRICS:
        raise SpaceError(f"{source}: metric: {show(metric)} is not one of {', '.join(METRICS)}")
    fixed = fixed_table(data.get("fixed", {}), f"{source}: fixed")
    raw_stages = data.get("stage")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise SpaceError(f"{source}: stage: expected at least one [[stage]] table")
    names = [raw.get("name") if isinstance(raw, dict) else None for raw in raw_stages]
    stages: list[Stage] = []
    for index, raw in enumerate(raw_stages):
        stages.append(_stage(raw, index, names, stages, source))
    cycles = count(data.get("cycles", 1), f"{source}: cycles", minimum=1)
    if cycles > MAX_CYCLES:
        raise SpaceError(f"{source}: cycles: at most {MAX_CYCLES}, got {cycles}; for more, search"
                         " the parameters together (a joint table)")
    ties = data.get("ties", "earlier")
    if not isinstance(ties, str) or ties not in TIES:
        raise SpaceError(f"{source}: ties: {show(ties)} is not one of {', '.join(TIES)}")
    stages += _later_passes(stages, cycles, source)
    if JOINT in data:
        stages.append(_joint(data[JOINT], stages, source))
    if SCREEN in data:
        stages.insert(0, _all_params(data[SCREEN], SCREEN, SCREEN_KEYS, stages, source,
                                     leave_out=DISTILLATION))
    confirm = None
    if "confirm" in data:
        if CONFIRM_STAGE in {stage.name for stage in stages}:
            raise SpaceError(f"{source}: stage {CONFIRM_STAGE!r}: the name is the confirmation"
                             " stage's; rename the stage")
        confirm = _confirm(data["confirm"], stages[-1].epochs, f"{source}: confirm")
        stages.append(Stage(CONFIRM_STAGE, confirm.top * confirm.seeds,
                            confirm.epochs or stages[-1].epochs, Pruner("none"),
                            confirms=confirm))
    pipeline = Pipeline(dataset, metric, fixed, tuple(stages), cycles, JOINT in data,
                        screen=SCREEN in data, ties=ties, confirm=confirm)
    _check_configs(pipeline, source)
    return pipeline


def _confirm(raw: Any, epochs: int, at: str) -> Confirm:
    if not isinstance(raw, dict):
        raise SpaceError(f"{at}: expected a table such as {{ top = 3, seeds = 3 }}, got"
                         f" {show(raw)}")
    no_unknown_keys(raw, CONFIRM_KEYS, f"{at}.")
    top = count(raw.get("top", Confirm.top), f"{at}.top", 1)
    seeds = count(raw.get("seeds", Confirm.seeds), f"{at}.seeds", 1)
    confirm_epochs = None
    if "epochs" in raw:
        try:
            confirm_epochs = field_value("epochs", raw["epochs"])
        except ParamError as err:
            raise SpaceError(f"{at}.epochs: {err}") from None
    return Confirm(top, seeds, confirm_epochs)


def sampler_table(raw: Any, at: str) -> Sampler:
    """`sampler = { startup_trials = N, stratified = true }`; both optional."""
    if not isinstance(raw, dict):
        raise SpaceError(f"{at}: expected a table, got {show(raw)}")
    no_unknown_keys(raw, (*_DEFAULT_SAMPLER, "stratified"), f"{at}.")
    stratified = raw.get("stratified", False)
    if not isinstance(stratified, bool):
        raise SpaceError(f"{at}.stratified: expected true or false, got {show(stratified)}")
    rest = {k: v for k, v in raw.items() if k != "stratified"}
    return Sampler(**counts(rest, _DEFAULT_SAMPLER, at), stratified=stratified)


def _pruner(raw: Any, epochs: int, at: str) -> Pruner:
    if not isinstance(raw, dict):
        raise SpaceError(f"{at}: expected a table, got {show(raw)}")
    kind = raw.get("type", "median")
    if kind not in PRUNER_KEYS:
        raise SpaceError(f"{at}.type: {show(kind)} is not one of {', '.join(PRUNER_KEYS)}")
    keys = PRUNER_KEYS[kind]
    rest = {k: v for k, v in raw.items() if k != "type"}
    no_unknown_keys(rest, keys, f"{at}.")
    values = counts(rest, {k: _DEFAULT_PRUNER[k] for k in keys}, at)
    if values.get("reduction_factor", 2) < 2:
        raise SpaceError(f"{at}.reduction_factor: must be at least 2, got"
                         f" {values['reduction_factor']}")
    if "min_epochs" in values and not 1 <= values["min_epochs"] <= epochs:
        raise SpaceError(f"{at}.min_epochs: must be between 1 and the stage's {epochs} epochs,"
                         f" got {values['min_epochs']}")
    return Pruner(type=kind, **values)


def _stage(raw: Any, index: int, names: list, done: list[Stage], source: str) -> Stage:
    at = f"{source}: stage #{index + 1}"
    if not isinstance(raw, dict):
        raise SpaceError(f"{at}: expected a table, got {show(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _STAGE_NAME.fullmatch(name):
        raise SpaceError(f"{at}: name: expected 1 to 64 letters, digits, _ or -, got {show(name)}")
    if name in (stage.name for stage in done):
        raise SpaceError(f"{at}: name: {name!r} is already the name of an earlier stage")
    at = f"{source}: stage {name!r}"
    no_unknown_keys(raw, STAGE_KEYS, f"{at}: ")
    if "trials" not in raw or "epochs" not in raw:
        raise SpaceError(f"{at}: {'trials' if 'trials' not in raw else 'epochs'}: missing")
    trials = count(raw["trials"], f"{at}: trials", minimum=1)
    try:
        epochs = field_value("epochs", raw["epochs"])
    except ParamError as err:
        raise SpaceError(f"{at}: epochs: {err}") from None
    pruner = _pruner(raw.get("pruner", {}), epochs, f"{at}: pruner")
    sampler = sampler_table(raw.get("sampler", {}), f"{at}: sampler")
    teacher = _teacher(raw.get("teacher"), name, names, done, f"{at}: teacher")
    fixed = fixed_table(raw.get("fixed", {}), f"{at}: fixed")
    warm_start = raw.get("warm_start", False)
    if not isinstance(warm_start, bool):
        raise SpaceError(f"{at}: warm_start: expected true or false, got {show(warm_start)}")
    patience = raw.get("patience")
    if patience is not None:
        patience = count(patience, f"{at}: patience", minimum=1)
    params_raw = raw.get("params", {})
    if not isinstance(params_raw, dict):
        raise SpaceError(f"{at}: params: expected a table, got {show(params_raw)}")
    params: dict[str, Param] = {}
    for key, table in params_raw.items():
        try:
            check_field(key, searched=True)
            params[key] = parse_param(key, table)
        except ParamError as err:
            raise SpaceError(f"{at}: params.{key_text(key)}: {err}") from None
        if key in fixed:
            raise SpaceError(f"{at}: params.{key}: also in this stage's fixed; keep one")
    start = _start(raw.get("start", []), params, trials, f"{at}: start")
    return Stage(name, trials, epochs, pruner, sampler, params, fixed, teacher,
                 warm_start=warm_start, patience=patience, start=start)


def _start(raw: Any, params: dict[str, Param], trials: int, at: str) -> tuple[dict[str, Any], ...]:
    """A stage's `start` list: tables of its own params' values, each value one the param can
    take, at most `trials` of them (each is one of the stage's trials), no two the same."""
    if not isinstance(raw, list):
        raise SpaceError(f"{at}: expected a list of tables like [{{ lr = 0.1 }}], got {show(raw)}")
    if len(raw) > trials:
        raise SpaceError(f"{at}: {len(raw)} configurations, more than the stage's {trials}"
                         " trials; each start configuration is one of its trials")
    points: list[dict[str, Any]] = []
    for n, point in enumerate(raw, start=1):
        if not isinstance(point, dict) or not point:
            raise SpaceError(f"{at} #{n}: expected a table of this stage's params, like"
                             f" {{ lr = 0.1 }}, got {show(point)}")
        values: dict[str, Any] = {}
        for key, value in point.items():
            if key not in params:
                raise SpaceError(f"{at} #{n}: {key_text(key)} is not searched in this stage"
                                 f" (it searches {', '.join(sorted(params)) or 'nothing'})")
            try:
                values[key] = in_range(params[key], field_value(key, value))
            except ParamError as err:
                raise SpaceError(f"{at} #{n}: {key}: {err}") from None
        if values in points:
            raise SpaceError(f"{at} #{n}: the same configuration as #{points.index(values) + 1}")
        points.append(values)
    return tuple(points)


def _later_passes(first: list[Stage], cycles: int, source: str) -> list[Stage]:
    """Passes 2..cycles over the file's stages: copies named `<name>-<k>`, warm-started, a
    teacher taken from the same pass (the teacher stage runs before its pupil in every pass)."""
    names = {stage.name for stage in first}
    out: list[Stage] = []
    for k in range(2, cycles + 1):
        for stage in first:
            name = f"{stage.name}-{k}"
            if not _STAGE_NAME.fullmatch(name):
                raise SpaceError(f"{source}: cycles: pass {k} of stage {stage.name!r} would be"
                                 f" named {name!r}, over 64 characters; shorten the stage's name")
            if name in names:
                raise SpaceError(f"{source}: cycles: pass {k} of stage {stage.name!r} is named"
                                 f" {name!r}, the name of a stage in the file; rename that stage")
            teacher = None if stage.teacher is None else f"{stage.teacher}-{k}"
            # A later pass starts from its warm start, not from the first pass's start list.
            out.append(dataclasses.replace(stage, name=name, warm_start=True, teacher=teacher,
                                           start=()))
    return out


def _joint(raw: Any, stages: list[Stage], source: str) -> Stage:
    """The joint stage: every stage's params, warm-started by default."""
    if isinstance(raw, dict):
        raw = {"warm_start": True, **raw}
    return _all_params(raw, JOINT, JOINT_KEYS, stages, source)


def _all_params(raw: Any, name: str, keys: tuple[str, ...], stages: list[Stage], source: str,
                leave_out: tuple[str, ...] = ()) -> Stage:
    """The joint or screening stage called `name`: every stage's params but `leave_out` (a
    parameter in several: the last definition wins), read like a stage from the table's `keys`
    otherwise."""
    at = f"{source}: {name}"
    if not isinstance(raw, dict):
        raise SpaceError(f"{at}: expected a table like {{ trials = 20, epochs = 10 }}, got"
                         f" {show(raw)}")
    no_unknown_keys(raw, keys, f"{at}: ")
    taken = [i for i, stage in enumerate(stages) if stage.name == name]
    if taken:
        raise SpaceError(f"{at}: the {name} stage is named {name!r}, as is stage"
                         f" #{taken[0] + 1}; rename that stage")
    params = {key: param for stage in stages for key, param in stage.params.items()
              if key not in leave_out}
    if not params:
        raise SpaceError(f"{at}: the stages search nothing the {name} stage could search")
    if "kd_alpha" in params:
        raise SpaceError(f"{at}: the {name} stage would search kd_alpha, but it has no teacher to"
                         f" distil from; drop the {name} table, or search kd_alpha in no stage")
    table = {"name": name, **raw,
             "params": {key: param_table(param) for key, param in params.items()}}
    return _stage(table, len(stages), [s.name for s in stages], stages, source)


def _teacher(value: Any, name: str, names: list, done: list[Stage], at: str) -> str | None:
    if value is None:
        return None
    earlier = [stage.name for stage in done]
    if not isinstance(value, str) or not value.startswith("best:"):
        raise SpaceError(f'{at}: expected "best:<earlier stage>", got {show(value)}')
    ref = value.removeprefix("best:")
    if ref in earlier:
        return ref
    if ref == name:
        raise SpaceError(f"{at}: a stage cannot distil from itself")
    if ref in names:
        raise SpaceError(f"{at}: stage {ref!r} runs later; the teacher must be an earlier stage")
    close = difflib.get_close_matches(ref, earlier, n=1)
    hint = f"; did you mean best:{close[0]}?" if close else f"; earlier stages: {earlier or 'none'}"
    raise SpaceError(f"{at}: no stage named {ref!r}{hint}")


def _check_configs(pipeline: Pipeline, source: str) -> None:
    """Check each stage's assembled config, and each searched or carried value against it.

    Values are checked one at a time (not every combination), which catches the cross-field
    rules of `trainer.config.check` for any single choice: a CIFAR net with torchvision weights,
    a batch size that accum_steps does not divide, kd_alpha > 0 in a stage without a teacher.
    """
    carried: dict[str, tuple[str, Param]] = {}
    for stage in pipeline.stages:
        at = f"{source}: stage {stage.name!r}"
        base = base_config(pipeline, stage, {})
        if stage.teacher:
            base["teacher"] = f"best:{stage.teacher}"  # stands in for the path the worker fills
        try:
            check_config(base)
        except ParamError as err:
            raise SpaceError(f"{at}: {_hint(err)} (from dataset + fixed + stage fixed)") from None
        todo = [(key, p, "", base) for key, p in stage.params.items()]
        for key, (origin, p) in carried.items():
            if key not in stage.fixed and key not in stage.params:
                # A distilling stage's teacher is carried on with its params (search/db/pipeline.py
                # `carried_from`), so a carried kd_alpha comes with its teacher.
                teacher = pipeline.stage(origin).teacher
                with_teacher = {**base, "teacher": f"best:{teacher}"} if teacher else base
                todo.append((key, p, f" (carried from stage {origin!r})", with_teacher))
        for key, param, note, on in todo:
            try:
                check_values(on, key, param)
            except ParamError as err:
                raise SpaceError(f"{at}: params.{key}{note}: {_hint(err)}") from None
        if stage.teacher and not any(v > 0 for v in _kd_alphas(pipeline, stage, carried)):
            raise SpaceError(
                f"{at}: teacher: kd_alpha is 0 in every trial of this stage, so the teacher would"
                " never be used; search kd_alpha (e.g. { low = 0.1, high = 0.9 }) or fix it > 0"
            )
        carried.update({key: (stage.name, p) for key, p in stage.params.items()})


def _hint(err: ParamError) -> str:
    """The message, plus how a space file gives a stage its teacher when that is what is missing."""
    if "kd_alpha" in str(err) and "teacher" in str(err):
        return f'{err}; in a space file, give the stage teacher = "best:<earlier stage>"'
    return str(err)


def _kd_alphas(pipeline: Pipeline, stage: Stage, carried: dict[str, tuple[str, Param]]) -> tuple:
    """The kd_alpha values a trial of `stage` can have (ends of a range)."""
    if "kd_alpha" in stage.params:
        return values_to_check(stage.params["kd_alpha"])
    if "kd_alpha" in stage.fixed:
        return (stage.fixed["kd_alpha"],)
    if "kd_alpha" in carried:
        return values_to_check(carried["kd_alpha"][1])
    return (pipeline.fixed.get("kd_alpha", TrainConfig.kd_alpha),)


def _to_data(pipeline: Pipeline) -> dict[str, Any]:
    """The file's own shape: its stages once (not their later passes, the joint or the
    confirmation stage), and a key the file did not need (cycles, joint, screen, ties,
    warm_start, patience, start, confirm) only when it differs
    from its default, so the stored pipelines of older files keep their digest."""
    searched = [stage for stage in pipeline.stages if stage.confirms is None]
    body = searched[pipeline.screen:]
    first = body[:(len(body) - pipeline.joint) // pipeline.cycles]
    stages = []
    for stage in first:
        data: dict[str, Any] = {
            "name": stage.name,
            "trials": stage.trials,
            "epochs": stage.epochs,
            "pruner": stage.pruner.table(),
            "sampler": stage.sampler.table(),
            "fixed": dict(stage.fixed),
            "params": {key: param_table(p) for key, p in stage.params.items()},
        }
        if stage.teacher is not None:
            data["teacher"] = f"best:{stage.teacher}"
        stages.append(data | _stage_extras(stage, default_warm=False))
    out: dict[str, Any] = {
        "dataset": pipeline.dataset,
        "metric": pipeline.metric,
        "fixed": dict(pipeline.fixed),
        "stage": stages,
    }
    if pipeline.cycles != 1:
        out["cycles"] = pipeline.cycles
    if pipeline.ties != "earlier":
        out["ties"] = pipeline.ties
    if pipeline.joint:
        out[JOINT] = _derived(searched[-1], default_warm=True)
    if pipeline.screen:
        out[SCREEN] = _derived(searched[0], default_warm=False)
    if pipeline.confirm is not None:
        c = pipeline.confirm
        out["confirm"] = {"top": c.top, "seeds": c.seeds,
                          **({"epochs": c.epochs} if c.epochs is not None else {})}
    return out


def _derived(stage: Stage, default_warm: bool) -> dict[str, Any]:
    """The table of a stage whose params are derived (joint, screen)."""
    return {"trials": stage.trials, "epochs": stage.epochs, "pruner": stage.pruner.table(),
            "sampler": stage.sampler.table(),
            "fixed": dict(stage.fixed)} | _stage_extras(stage, default_warm)


def _stage_extras(stage: Stage, default_warm: bool) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    if stage.warm_start != default_warm:
        extras["warm_start"] = stage.warm_start
    if stage.patience is not None:
        extras["patience"] = stage.patience
    if stage.start:
        extras["start"] = [dict(point) for point in stage.start]
    return extras
