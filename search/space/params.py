"""Search parameters and the checks of single entries of a space file.

A parameter is one TrainConfig field's range or choices, turned into an Optuna distribution.
Checks of one field raise `ParamError` with a message relative to that field, which
`search/space.py` prefixes with the file and stage; checks of whole tables raise `SpaceError`.
"""

from __future__ import annotations

import decimal
import difflib
import math
import reprlib
from dataclasses import dataclass
from typing import Any

import optuna

from trainer.config import FIELD_NAMES, ConfigError, TrainConfig, coerce, field_type, with_overrides

PARAM_KEYS = ("low", "high", "log", "step", "choices")

# Fields a space file may not set, and why. The worker owns the per-trial runtime (checkpoint
# folder, resuming, device, the teacher checkpoint path); `dataset` and `epochs` have their own
# keys so they cannot be set twice.
_RESERVED = {
    "checkpoint_dir": "the worker gives every trial its own checkpoint folder",
    "resume": "the worker resumes retried trials itself",
    "device": "each worker process picks its own device",
    "teacher": 'the worker fills it in from the stage\'s teacher = "best:<stage>"',
    "dataset": "use the top-level dataset key",
    "epochs": "use the stage's epochs key",
    "best_metric": "a trial keeps its best epoch by the top-level metric key",
    "test": "a search tests its winner alone, once; trials record validation metrics",
}
# Fixed is fine for these (tests inject faults through a space), searching them is not.
_NOT_SEARCHABLE = {"fault": "it is a testing aid; fix it in [fixed] if you need it"}

# Int ranges up to this many values are checked value by value against a stage's config, so
# that e.g. a batch_size range that accum_steps does not divide is caught; longer ones at the ends.
_CHECK_EVERY_INT = 256

# Narrower float ranges (relative to their size) are rounding noise, and Optuna's TPE returns NaN
# for a log range one float apart.
_MIN_WIDTH = 1e-9

_short = reprlib.Repr()
_short.maxstring = _short.maxother = _short.maxlong = 40
_short.maxlevel = 2


class SpaceError(ValueError):
    """A space file is unreadable or invalid; the message names the file, stage and field."""


class ParamError(ValueError):
    """One field's name or value is wrong; the message does not repeat the field's name."""


def show(value: Any) -> str:
    """A short repr for error messages, safe on huge or deeply nested input."""
    return _short.repr(value)


@dataclass(frozen=True)
class FloatParam:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class IntParam:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class CategoricalParam:
    choices: tuple


Param = FloatParam | IntParam | CategoricalParam


def distribution(param: Param) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution that samples `param`."""
    if isinstance(param, FloatParam):
        return optuna.distributions.FloatDistribution(
            param.low, param.high, log=param.log, step=param.step
        )
    if isinstance(param, IntParam):
        return optuna.distributions.IntDistribution(
            param.low, param.high, log=param.log, step=param.step
        )
    return optuna.distributions.CategoricalDistribution(param.choices)


def check_field(name: Any, searched: bool) -> None:
    """Raise ParamError unless a space may set field `name` (in params when `searched`)."""
    if not isinstance(name, str) or name not in FIELD_NAMES:
        close = difflib.get_close_matches(str(name), sorted(FIELD_NAMES), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "see trainer/config.py"
        raise ParamError(f"not a TrainConfig field; {hint}")
    if name in _RESERVED:
        raise ParamError(f"a space file cannot set it: {_RESERVED[name]}")
    if searched and name in _NOT_SEARCHABLE:
        raise ParamError(f"cannot be searched: {_NOT_SEARCHABLE[name]}")


def field_value(name: str, value: Any) -> Any:
    """`value` checked for field `name` and returned in the field's type.

    Stricter than `coerce` on numbers: an int field takes only integers (2.0 is refused, so a
    range written with floats is never silently an int range) and no field takes a bool for a
    number.
    """
    kind = field_type(name)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParamError(f"expected an integer, got {show(value)}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ParamError(f"expected a number, got {show(value)}")
    try:
        return coerce(name, value)
    except OverflowError:
        raise ParamError(f"{show(value)} is too large") from None
    except ConfigError as err:
        raise ParamError(str(err).removeprefix(f"{name}: ")) from None


def parse_param(name: str, table: Any) -> Param:
    """One `[stage.params]` entry for field `name` (already known to be searchable)."""
    if not isinstance(table, dict):
        raise ParamError(
            f"expected a table like {{ low = 0.01, high = 1.0 }} or {{ choices = [...] }},"
            f" got {show(table)}"
        )
    unknown = [key_text(k) for k in table if k not in PARAM_KEYS]
    if unknown:
        raise ParamError(f"unknown key {', '.join(unknown)}; known: {', '.join(PARAM_KEYS)}")
    if "choices" in table:
        if len(table) > 1:
            others = ", ".join(sorted(k for k in table if k != "choices"))
            raise ParamError(f"choices cannot be combined with {others}")
        return _categorical(name, table["choices"])
    kind = field_type(name)
    if kind not in (int, float):
        raise ParamError(f"a {kind.__name__} field is searched with choices = [...] only")
    if "low" not in table or "high" not in table:
        raise ParamError("needs low and high (or choices = [...])")
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise ParamError(f"log: expected true or false, got {show(log)}")
    if log and "step" in table:
        raise ParamError("step cannot be combined with log = true")
    low, high = _bound(name, "low", table["low"]), _bound(name, "high", table["high"])
    if not low < high:
        hint = "; a single value belongs in [stage.fixed]" if low == high else ""
        raise ParamError(f"low ({low}) must be below high ({high}){hint}")
    if log and low <= 0:
        raise ParamError(f"log = true needs low > 0, got {low}")
    if kind is float and high - low <= _MIN_WIDTH * max(abs(low), abs(high)):
        raise ParamError(f"low ({low}) and high ({high}) are too close to search between")
    if kind is int:
        step = table.get("step", 1)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ParamError(f"step: expected a positive integer, got {show(step)}")
        if (high - low) % step:
            raise ParamError(f"step ({step}) must divide high - low ({high - low})")
        return IntParam(low, high, step, log)
    return FloatParam(low, high, log, _float_step(low, high, table.get("step")))


def param_table(param: Param) -> dict[str, Any]:
    """The file form of `param`, which `parse_param` reads back to an equal param."""
    if isinstance(param, CategoricalParam):
        return {"choices": list(param.choices)}
    table: dict[str, Any] = {"low": param.low, "high": param.high, "log": param.log}
    if isinstance(param, FloatParam) and param.step is not None:
        table["step"] = param.step
    if isinstance(param, IntParam) and param.step != 1:
        table["step"] = param.step
    return table


def check_config(overrides: dict[str, Any]) -> None:
    """Raise ParamError if the default TrainConfig with `overrides` breaks a rule."""
    try:
        with_overrides(TrainConfig(), overrides)
    except ConfigError as err:
        raise ParamError(str(err)) from None


def check_values(base: dict[str, Any], name: str, param: Param) -> None:
    """Raise ParamError if some value of `param` breaks a rule on top of `base` overrides.

    One value at a time, not every combination with a stage's other params: this catches the
    cross-field rules of `trainer.config.check` for any single value (a CIFAR net with torchvision
    weights, a batch size accum_steps does not divide, kd_alpha > 0 without a teacher).
    """
    for value in values_to_check(param):
        try:
            with_overrides(TrainConfig(), {**base, name: value})
        except ConfigError as err:
            raise ParamError(
                f"the value {value!r} clashes with this stage's config: {err}"
            ) from None


def values_to_check(param: Param) -> tuple:
    """Every value of a categorical or short int range; the ends of anything else."""
    if isinstance(param, CategoricalParam):
        return param.choices
    if isinstance(param, IntParam) and (param.high - param.low) // param.step < _CHECK_EVERY_INT:
        return tuple(range(param.low, param.high + 1, param.step))
    return (param.low, param.high)


def in_range(param: Param, value: Any) -> Any:
    """`value` (already in the field's type) if `param` can take it, else ParamError: one of
    its choices, or within its range and on its step's grid (`hpo enqueue`, warm starts)."""
    if isinstance(param, CategoricalParam):
        if not any(type(c) is type(value) and c == value for c in param.choices):
            raise ParamError(f"{show(value)} is not one of {list(param.choices)}")
        return value
    assert isinstance(param, FloatParam | IntParam)
    if not param.low <= value <= param.high:
        raise ParamError(f"{show(value)} is outside the stage's range [{param.low}, {param.high}]")
    if param.step and not math.isclose((value - param.low) / param.step,
                                       round((value - param.low) / param.step), abs_tol=1e-9):
        raise ParamError(f"{show(value)} is not on the grid {param.low} + k * {param.step}")
    return value


def _bound(name: str, key: str, value: Any) -> Any:
    try:
        return field_value(name, value)
    except ParamError as err:
        raise ParamError(f"{key}: {err}") from None


def _float_step(low: float, high: float, step: Any) -> float | None:
    if step is None:
        return None
    try:
        ok = isinstance(step, int | float) and not isinstance(step, bool)
        ok = ok and 0 < float(step) < float("inf")
    except OverflowError:
        ok = False
    if not ok:
        raise ParamError(f"step: expected a positive number, got {show(step)}")
    step = float(step)
    # Decimal, as Optuna does, so that 0.1 divides 0.3; Optuna would otherwise move `high`.
    dec = decimal.Decimal
    try:
        exact = (dec(str(high)) - dec(str(low))) % dec(str(step)) == 0
    except decimal.InvalidOperation:  # more grid points than Decimal's precision
        exact = False
    if not exact:
        raise ParamError(f"step ({step}) must divide high - low ({high} - {low})")
    return step


def _categorical(name: str, choices: Any) -> CategoricalParam:
    if not isinstance(choices, list | tuple):
        raise ParamError(f"choices: expected a list, got {show(choices)}")
    if not choices:
        raise ParamError("choices: the list is empty")
    values: list[Any] = []
    for i, choice in enumerate(choices):
        try:
            value = field_value(name, choice)
        except ParamError as err:
            raise ParamError(f"choices[{i}]: {err}") from None
        if value in values:
            raise ParamError(f"choices: {show(value)} appears twice")
        values.append(value)
    return CategoricalParam(tuple(values))


# --- checks of whole tables; `at` says where in the file, and errors are SpaceErrors ---


def fixed_table(table: Any, at: str) -> dict[str, Any]:
    """A [fixed] table: field names a space may set, each value checked for its field."""
    if not isinstance(table, dict):
        raise SpaceError(f"{at}: expected a table, got {show(table)}")
    fixed: dict[str, Any] = {}
    for key, value in table.items():
        try:
            check_field(key, searched=False)
            fixed[key] = field_value(key, value)
        except ParamError as err:
            raise SpaceError(f"{at}.{key_text(key)}: {err}") from None
    return fixed


def count(value: Any, at: str, minimum: int) -> int:
    """An integer (never a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpaceError(f"{at}: expected an integer, got {show(value)}")
    if value < minimum:
        raise SpaceError(f"{at}: must be at least {minimum}, got {value}")
    return value


def counts(table: Any, defaults: dict[str, int], at: str) -> dict[str, int]:
    """A table of non-negative integers with these keys and defaults (pruner, sampler)."""
    if not isinstance(table, dict):
        raise SpaceError(f"{at}: expected a table, got {show(table)}")
    no_unknown_keys(table, tuple(defaults), f"{at}.")
    return {
        key: count(table.get(key, default), f"{at}.{key}", 0) for key, default in defaults.items()
    }


def no_unknown_keys(table: dict, known: tuple[str, ...], at: str) -> None:
    """`at` ends in ": " for a file or stage, or in "." for a sub-table such as "pruner."."""
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(known)}"
            raise SpaceError(f"{at}{key_text(key)}: unknown key; {hint}")


def key_text(key: Any) -> str:
    """A key as written in the file, or its short repr when it is not a plain short string."""
    if isinstance(key, str) and key.isprintable() and 0 < len(key) <= 60:
        return key
    return show(key)
