"""The sampler and pruner a stage runs with, built from its space-file settings.

- Pruners: `median` (our incremental `algorithms.MedianPruner`, Optuna's decisions), `hyperband`
  and `successive_halving` (Optuna's, from `min_epochs` to the stage's epochs), or `none`.
- The sampler: Optuna's TPE (`algorithms.TPESampler`: multivariate, grouped, constant liar)
  wrapped in `Deduplicating` when the stage's space is finite, so a configuration is never
  trained twice in a stage (training is deterministic for a given seed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from search.db import budget
from search.runtime import algorithms
from search.space import grid
from search.space.params import distribution
from search.space.spec import Stage


def make_pruner(stage: Stage) -> optuna.pruners.BasePruner:
    p = stage.pruner
    if p.type == "median":
        return algorithms.MedianPruner(n_startup_trials=p.startup_trials,
                                       n_warmup_steps=p.warmup_epochs)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_epochs, max_resource=stage.epochs,
            reduction_factor=p.reduction_factor)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_epochs, reduction_factor=p.reduction_factor)
    assert p.type == "none", p.type
    return optuna.pruners.NopPruner()


def make_sampler(stage: Stage, seed: int, warm: Sequence[FrozenTrial] = (),
                 trained: str | None = None) -> BaseSampler:
    """`warm`: earlier trials to start TPE from (`search.db.pipeline.warm_trials`), in memory.
    `trained`: the configuration (`grid.key`) the stage carried in when an earlier stage trained
    exactly it (`search.db.pipeline.open_stage`); a finite stage proposes it no more."""
    tpe = algorithms.TPESampler(
        n_startup_trials=stage.sampler.startup_trials, multivariate=True, group=True,
        constant_liar=True, seed=seed, warm=warm, stratified=stage.sampler.stratified,
    )
    configurations = grid.configurations(stage.params)
    if configurations is None:
        return tpe
    return Deduplicating(tpe, {n: distribution(p) for n, p in stage.params.items()},
                         configurations, seed, trained)


class Deduplicating(BaseSampler):
    """TPE over a finite space, without repeats: when TPE (or its random start-up) proposes a
    configuration that a trial of the stage holds already (finished, running or waiting), one of
    the untried configurations is taken instead, at random. TPE still learns from every trial;
    only its repeats are replaced. (`writes.ask` creates no trial once every configuration is
    held, so an untried one exists whenever a trial samples; two workers sampling at once may
    still pick the same one, which `writes.reserve` settles.)"""

    def __init__(
        self, base: BaseSampler, space: dict[str, BaseDistribution],
        configurations: Sequence[dict[str, Any]], seed: int, trained: str | None = None,
    ) -> None:
        self.base, self.space, self.configurations = base, space, list(configurations)
        self.trained = trained  # held from before the stage: its trial is an earlier stage's
        self._rng = random.Random(seed)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        self.base.infer_relative_search_space(study, trial)  # TPE keeps its groups up to date
        return dict(self.space)  # every parameter is decided here, in one piece

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        proposal = self.base.sample_relative(study, trial, search_space)
        for name, dist in self.space.items():
            if name not in proposal:
                proposal[name] = self.base.sample_independent(study, trial, name, dist)
        held = {grid.key(t.params) for t in study.get_trials(deepcopy=False, states=budget.HOLDING)
                if t.number != trial.number and set(t.params) == set(self.space)}
        if self.trained is not None:
            held.add(self.trained)
        if grid.key(proposal) not in held:
            return proposal
        untried = [c for c in self.configurations if grid.key(c) not in held]
        if not untried:  # a race past `writes.ask`'s count; train the repeat rather than nothing
            return proposal
        return dict(self._rng.choice(untried))

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
