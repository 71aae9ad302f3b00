"""TPE and the median pruner as a worker runs them: Optuna's own classes, with reads that stay
cheap as a study grows. Each makes exactly the decisions of the class it extends on the same
trials (the tests compare them trial by trial); only where their data comes from changes, and
with many workers, how recent a read TPE samples from (milliseconds).

- `MedianPruner`: Optuna's reads the whole study at every `should_prune` (every trial with all
  its attributes from the database's trial cache, sorted), nine times per 10-epoch trial. This one
  keeps the intermediate values of the study's complete trials in memory and asks the database
  only about trials it has not yet seen finish: one narrow query per call.
- `TPESampler`: Optuna's rebuilds, at every `ask`, the grouped search space, every finished
  trial's sort key (its value, or for a pruned trial its last step and value, after a look at its
  constraints) and the internal form of its parameters: Python work per finished trial that
  grows the cost of an ask with the study. This one does all three once per finished trial;
  what is left per ask (sorting, the Parzen estimators) is done by numpy or in C. Under constant
  liar Optuna also reads the study again for every parameter group, to see the latest running
  trials; this one samples from the read made when the same trial began to sample, when that was
  the first read since its ask (so, in one worker, the same trials).

  Given `warm` trials (a warm start: complete trials from earlier stages,
  `search.db.pipeline.warm_trials`), it reads them as trials of the study that came before its
  own, in memory only, and counts them toward its start-up trials. Without, it is Optuna's TPE.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import optuna
import sqlalchemy as sa
from optuna.distributions import BaseDistribution
from optuna.samplers._tpe.sampler import _get_infeasible_trial_score, _get_pruned_trial_score
from optuna.search_space.group_decomposed import _GroupDecomposedSearchSpace, _SearchSpaceGroup
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from search.db import optuna_private as op
from search.runtime import startup

if TYPE_CHECKING:
    from collections.abc import Container, Sequence


class MedianPruner(optuna.pruners.MedianPruner):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._complete = _CompleteTrials()

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        # Optuna makes these two checks after reading the study; they do not depend on it.
        if trial.last_step is None or trial.last_step < self._n_warmup_steps:
            return False
        backend = op.study_rdb(study)
        if backend is None:
            return super().prune(study, trial)
        complete = self._complete.read(backend.engine, op.study_id(study))
        return super().prune(cast("optuna.Study", _CompleteView(study, complete)), trial)


class _Complete:
    """What the percentile rule reads of a complete trial."""

    __slots__ = ("intermediate_values",)

    def __init__(self, intermediate_values: dict[int, float]) -> None:
        self.intermediate_values = intermediate_values


class _CompleteTrials:
    """The complete trials of one study, read incrementally. Trial ids of a study become visible
    in increasing order (Optuna creates trials under a lock on the study's row), so trials above
    the highest id seen are new, and below it only those last seen waiting or running can still
    change."""

    def __init__(self) -> None:
        self.study_id: int | None = None
        self.trials: list[_Complete] = []
        self.highest = -1  # highest trial id seen
        self.open: set[int] = set()  # ids up to `highest` last seen waiting or running

    def read(self, engine: sa.Engine, study_id: int) -> list[_Complete]:
        if study_id != self.study_id:
            self.study_id, self.trials, self.highest, self.open = study_id, [], -1, set()
        trials, values = op.TRIALS, op.INTERMEDIATE
        unseen = trials.c.trial_id > self.highest
        if self.open:
            unseen = sa.or_(unseen, trials.c.trial_id.in_(sorted(self.open)))
        with engine.connect() as conn:
            complete = []
            for trial_id, state in conn.execute(
                sa.select(trials.c.trial_id, trials.c.state)
                .where(trials.c.study_id == study_id, unseen)
            ):
                state = TrialState[state] if isinstance(state, str) else state
                self.highest = max(self.highest, trial_id)
                if state in (TrialState.RUNNING, TrialState.WAITING):
                    self.open.add(trial_id)
                    continue
                self.open.discard(trial_id)
                if state == TrialState.COMPLETE:
                    complete.append(trial_id)
            if complete:
                by_trial: dict[int, dict[int, float]] = {trial_id: {} for trial_id in complete}
                for trial_id, step, value, kind in conn.execute(
                    sa.select(values.c.trial_id, values.c.step, values.c.intermediate_value,
                              values.c.intermediate_value_type)
                    .where(values.c.trial_id.in_(complete))
                ):
                    by_trial[trial_id][step] = op.intermediate_value(value, kind)
                self.trials.extend(_Complete(v) for v in by_trial.values())
        return self.trials


class _CompleteView:
    """The parts of a study `PercentilePruner.prune` reads: its direction and its complete
    trials, here from memory."""

    def __init__(self, study: optuna.Study, complete: list[_Complete]) -> None:
        self._study, self._complete = study, complete

    @property
    def direction(self) -> optuna.study.StudyDirection:
        return self._study.direction

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[Any]:
        # TPE asks for the complete trials as a tuple; any other request reads the study.
        if isinstance(states, tuple | list) and tuple(states) == (TrialState.COMPLETE,) \
                and not deepcopy:
            return self._complete
        return self._study.get_trials(deepcopy=deepcopy, states=states)


class TPESampler(optuna.samplers.TPESampler):
    def __init__(self, *, warm: Sequence[FrozenTrial] = (), stratified: bool = False,
                 **kwargs: Any) -> None:
        """Optuna's arguments, and `warm`: complete trials TPE reads before the study's own, each
        with a negative trial id of its own (the caches below key by trial id). They count
        toward `n_startup_trials`, so with as many warm trials as start-up trials TPE samples
        from the first trial on. `stratified`: the start-up trials are a Latin hypercube with
        as many strata as `n_startup_trials` (search/runtime/startup.py), not random draws."""
        super().__init__(**kwargs)
        self._strata = self._n_startup_trials if stratified else 0
        self._warm = list(warm)
        if self._warm:
            ids = {op.trial_id(t) for t in self._warm}
            if len(ids) != len(self._warm) or max(ids) >= 0:
                raise ValueError("warm trials need distinct negative trial ids")
            if not all(t.state == TrialState.COMPLETE for t in self._warm):
                raise ValueError("warm trials must be complete")
            if not (self._multivariate and self._group):
                raise ValueError("a warm start needs multivariate=True and group=True")
            self._n_startup_trials = max(0, self._n_startup_trials - len(self._warm))
        if getattr(self, "_group_decomposed_search_space", None) is not None:
            self._group_decomposed_search_space = _IncrementalGroupSpace(include_pruned=True,
                                                                         warm=self._warm)
        # Per search space: trial id -> its parameters' internal values, or () when it lacks one.
        self._rows: dict[tuple[Any, ...], dict[int, tuple[float, ...]]] = {}
        # Finished trial id -> (0 complete | 1 pruned | 2 infeasible, its sort key).
        self._keys: dict[int, tuple[int, Any]] = {}
        self._read_for: int | None = None  # the trial whose ask the study's trial cache follows

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        # Optuna's TPE samples a start-up trial here, at random, while fewer finished trials
        # than its start-up count exist (the same test as Optuna's, on the same cached read).
        if self._strata:
            finished = study._get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                 TrialState.PRUNED),
                                         use_cache=True)
            if len(finished) < self._n_startup_trials:
                return startup.sample(study.study_name, trial.number, param_name,
                                      param_distribution, self._strata)
        return super().sample_independent(study, trial, param_name, param_distribution)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        # The study's trial cache is emptied by every ask; filled now, it was read after this
        # trial began, so it holds everything `_sample` would read again for it.
        fresh = study._thread_local.cached_all_trials is None
        space = super().infer_relative_search_space(study, trial)
        if fresh and study._thread_local.cached_all_trials is not None:
            self._read_for = op.trial_id(trial)
        return space

    def _sample(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """Optuna's `_sample`, line for line, with `_split` for its `_split_trials` and the
        trials this ask has read already."""
        if study._is_multi_objective():
            return super()._sample(study, trial, search_space)
        if self._constant_liar:
            states = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING]
        else:
            states = [TrialState.COMPLETE, TrialState.PRUNED]
        # Under constant liar Optuna reads the study again here, to see the latest running trials:
        # every unfinished trial with all its attributes, once per parameter group. The first
        # read after this trial's ask (`infer_relative_search_space`) serves as well.
        trials = study._get_trials(deepcopy=False, states=states,
                                   use_cache=self._read_for == op.trial_id(trial))
        if self._constant_liar:
            trials = [t for t in trials if trial.number != t.number]
        if self._warm:
            trials = self._warm + trials  # numbered below the study's own: older
        if self._gamma is None:
            self._gamma = optuna.samplers._tpe.sampler.default_gamma
        n = sum(t.state != TrialState.RUNNING for t in trials)
        below_trials, above_trials = self._split(study, trials, self._gamma(n))
        mpe_below = self._build_parzen_estimator(study, search_space, below_trials,
                                                 handle_below=True)
        mpe_above = self._build_parzen_estimator(study, search_space, above_trials,
                                                 handle_below=False)
        samples_below = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        acq_func_vals = self._compute_acquisition_func(samples_below, mpe_below, mpe_above)
        ret = optuna.samplers.TPESampler._compare(samples_below, acq_func_vals)
        for param_name, dist in search_space.items():
            ret[param_name] = dist.to_external_repr(ret[param_name])
        return ret

    def _split(
        self, study: optuna.Study, trials: list[FrozenTrial], n_below: int
    ) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
        """Optuna's `_split_trials` for one objective, with each finished trial's kind and sort
        key computed by Optuna's own functions, once."""
        groups: tuple[list[FrozenTrial], ...] = ([], [], [])  # complete, pruned, infeasible
        running = []
        keys = self._keys
        for t in trials:
            if t.state == TrialState.RUNNING:
                running.append(t)
                continue
            key = keys.get(op.trial_id(t))
            if key is None:
                infeasible = _get_infeasible_trial_score(t)
                key = ((2, infeasible) if infeasible > 0
                       else (0, t.value) if t.state == TrialState.COMPLETE
                       else (1, _get_pruned_trial_score(t, study)))
                keys[op.trial_id(t)] = key
            groups[key[0]].append(t)
        below: list[FrozenTrial] = []
        above: list[FrozenTrial] = []
        for kind, group in enumerate(groups):
            ordered = sorted(group, key=lambda t: keys[op.trial_id(t)][1],
                             reverse=kind == 0 and study.direction == StudyDirection.MAXIMIZE)
            count = min(max(0, n_below - len(below)), len(ordered))
            below += ordered[:count]
            above += ordered[count:]
        below.sort(key=lambda t: t.number)
        above = sorted(above + running, key=lambda t: t.number)
        return below, above

    def _get_internal_repr(
        self, trials: list[FrozenTrial], search_space: dict[str, BaseDistribution],
        study: optuna.Study,
    ) -> dict[str, np.ndarray]:
        names = list(search_space)
        rows = self._rows.setdefault(tuple(search_space.items()), {})  # finished trials only
        kept = []
        for trial in trials:
            row = rows.get(op.trial_id(trial))
            if row is None:
                # As Optuna's: a running trial's params may include what constant liar shares.
                params = self._get_params(trial, study)
                row = (tuple(search_space[n].to_internal_repr(params[n]) for n in names)
                       if search_space.keys() <= params.keys() else ())
                if trial.state.is_finished():
                    rows[op.trial_id(trial)] = row
            if row:
                kept.append(row)
        # Column by column from Python values, as Optuna builds them (same dtypes).
        columns = list(zip(*kept, strict=True)) if kept else [() for _ in names]
        return {name: np.asarray(list(column)) for name, column in zip(names, columns,
                                                                        strict=True)}


class _IncrementalGroupSpace(_GroupDecomposedSearchSpace):
    """Optuna's grouped search space adds every finished trial's distributions again at every
    `ask`; adding a trial twice changes nothing, so each is added once."""

    def __init__(self, include_pruned: bool = False, warm: Sequence[FrozenTrial] = ()) -> None:
        super().__init__(include_pruned=include_pruned)
        self._added: set[int] = set()
        for trial in warm:  # a warm start's trials are in the space from the first ask on
            self._search_space.add_distributions(trial.distributions)

    def calculate(self, study: optuna.Study, use_cache: bool = False) -> _SearchSpaceGroup:
        if self._study_id is None:
            self._study_id = op.study_id(study)
        elif self._study_id != op.study_id(study):
            raise ValueError("`_GroupDecomposedSearchSpace` cannot handle multiple studies.")
        states = ((TrialState.COMPLETE, TrialState.PRUNED) if self._include_pruned
                  else (TrialState.COMPLETE,))
        for trial in study._get_trials(deepcopy=False, states=states, use_cache=use_cache):
            if op.trial_id(trial) not in self._added:
                self._search_space.add_distributions(trial.distributions)
                self._added.add(op.trial_id(trial))
        return copy.deepcopy(self._search_space)  # as Optuna's: the caller gets its own copy
