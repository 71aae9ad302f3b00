"""The finite configurations of a stage, when its space is finite: what lets a stage of only
categorical and stepped parameters train each configuration once and close when none is left.

Training is deterministic for a given seed, so a configuration trained twice in a stage is budget
spent on nothing; TPE proposes repeats readily in small categorical spaces.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from search.space.params import CategoricalParam, FloatParam, IntParam, Param

MAX_CONFIGURATIONS = 100_000  # beyond this a space counts as unbounded: repeats are rare


def values(param: Param) -> list[Any] | None:
    """Every value `param` can take, or None when that is a continuum."""
    if isinstance(param, CategoricalParam):
        return list(param.choices)
    if isinstance(param, IntParam):
        return list(range(param.low, param.high + 1, param.step))
    if isinstance(param, FloatParam) and param.step is not None:
        n = math.floor((param.high - param.low) / param.step + 1e-9)
        return [param.low + k * param.step for k in range(n + 1)]
    return None


def size(params: dict[str, Param]) -> int | None:
    """How many distinct configurations the stage can train; None when unbounded (or past
    MAX_CONFIGURATIONS) or when the stage searches nothing."""
    if not params:
        return None
    total = 1
    for param in params.values():
        options = values(param)
        if options is None:
            return None
        total *= len(options)
        if total > MAX_CONFIGURATIONS:
            return None
    return total


def configurations(params: dict[str, Param]) -> list[dict[str, Any]] | None:
    """All configurations of a finite space, in a fixed order; None when `size` is None."""
    if size(params) is None:
        return None
    names = sorted(params)
    grids = [values(params[n]) or [] for n in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grids)]


def key(params: dict[str, Any]) -> str:
    """A configuration as comparable text: its JSON with sorted keys, floats to 12 significant
    digits (a stepped float from the grid and the same value stored by Optuna may differ in
    the last bit)."""
    return json.dumps({k: float(f"{v:.12g}") if isinstance(v, float) else v
                       for k, v in params.items()}, sort_keys=True)
