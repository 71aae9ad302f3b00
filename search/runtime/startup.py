"""Stratified start-up trials for TPE (`sampler = { stratified = true }` in a space file).

TPE's first `startup_trials` trials are independent random draws. In a short stage they decide
where TPE looks next, and independent draws can all miss a region: on digits-hard
(bench/search_efficiency.py, `strat`) the 4 random start-up trials of a 12-trial optimizer
stage were all batch size 128 in one seed of 10, TPE never tried 64 after, and the stage ended
at 0.9418, against 0.9506 on average for the seeds whose TPE trained 64. Stratified, the
start-up trials are a Latin hypercube: each parameter's range is cut into as many strata as
there are start-up trials, and each stratum is taken once, in an order of its own per
parameter, so a categorical with no more choices than start-up trials has each choice tried
before TPE takes over. What it changed there and on synthetic-hard: BENCHMARKS.md, `strat`.

A stage's `start` configurations (search/space/spec.py) are its first trials and take the first
numbers, so the stratified trials after them take the strata of the numbers after theirs: with
one start configuration and 4 start-up trials, 3 of each parameter's 4 strata are tried.

A trial that fails keeps its number and its retry gets a later one; numbers past the start-up
count take the strata again from the first, so after a failure one stratum of each parameter
goes untried and one is taken twice (with another value inside it).

Which stratum a trial gets depends only on the stage study's name, the parameter and the
trial's number, never on the worker: every worker of a stage agrees on the design, and the
trial numbers the database hands out take its strata in turn.
"""

from __future__ import annotations

import math
import random
import zlib
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


def _rng(*parts: object) -> random.Random:
    # crc32 of the text, not hash(): Python salts str hashes per process, and the workers of a
    # stage are separate processes that must agree.
    return random.Random(zlib.crc32("\0".join(map(str, parts)).encode()))


def stratum(study: str, param: str, number: int, strata: int) -> int:
    """The stratum (0 .. strata-1) of trial `number` for `param`: a permutation of the strata
    per study and parameter, taken in trial order, so trials 0 .. strata-1 take each once."""
    order = list(range(strata))
    _rng(study, param).shuffle(order)
    return order[number % strata]


def value(dist: BaseDistribution, index: int, strata: int, jitter: float) -> Any:
    """The value of stratum `index` of `strata` for a distribution, `jitter` in [0, 1) placing
    it inside its stratum (on the log scale for a log range). A categorical's strata map onto
    its choices in order, as evenly as they divide, without jitter."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[index * len(dist.choices) // strata]
    u = (index + jitter) / strata
    if isinstance(dist, FloatDistribution):
        if dist.log:
            low, high = math.log(dist.low), math.log(dist.high)
            return min(dist.high, max(dist.low, math.exp(low + u * (high - low))))
        if dist.step is not None:
            steps = round((dist.high - dist.low) / dist.step)
            return dist.low + min(steps, math.floor(u * (steps + 1))) * dist.step
        return dist.low + u * (dist.high - dist.low)
    if isinstance(dist, IntDistribution):
        if dist.log:
            low, high = math.log(dist.low), math.log(dist.high + 1)
            return min(dist.high, max(dist.low, math.floor(math.exp(low + u * (high - low)))))
        steps = (dist.high - dist.low) // dist.step
        return dist.low + min(steps, math.floor(u * (steps + 1))) * dist.step
    raise TypeError(f"no stratified start-up for {type(dist).__name__}")


def sample(study: str, number: int, param: str, dist: BaseDistribution, strata: int) -> Any:
    """Trial `number`'s start-up value of `param` in the stage study `study`."""
    if dist.single():
        return _only(dist)
    index = stratum(study, param, number, strata)
    return value(dist, index, strata, _rng(study, param, number).random())


def _only(dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low  # type: ignore[attr-defined]
