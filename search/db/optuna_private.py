"""The one door to Optuna's private API. Every private name of Optuna's that the service relies
on is reached through this module (the sampler module, `search.runtime.algorithms`, is the one
other: it overrides TPE's private methods to stay decision-for-decision equal to Optuna's TPE).

Why reach in at all: the service writes trials exactly once in its own transactions
(`search.db.writes`), counts a stage's budget in SQL (`search.db.budget`), and keeps the per-trial
cost of a worker flat as a study grows (`search.runtime.algorithms`, `storage.set_user_attrs`).
None of that is possible through Optuna's public storage API, which has no transactions spanning
two calls and reads whole studies.

pyproject.toml pins the Optuna series the suite runs on (`optuna==5.0.*`), and
tests/search/test_optuna_internals.py checks that each name here still exists with the shape used,
so an upgrade breaks in one place, with one message naming this module.
"""

from __future__ import annotations

from typing import Any

import optuna
import sqlalchemy as sa
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX as _ARTIFACTS_PREFIX
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models as _models
from optuna.trial import FrozenTrial

# Optuna's tables, as its ORM models define them.
TRIALS: sa.Table = _models.TrialModel.__table__
STUDIES: sa.Table = _models.StudyModel.__table__
PARAMS: sa.Table = _models.TrialParamModel.__table__
USER_ATTRS: sa.Table = _models.TrialUserAttributeModel.__table__
SYSTEM_ATTRS: sa.Table = _models.TrialSystemAttributeModel.__table__
STUDY_ATTRS: sa.Table = _models.StudyUserAttributeModel.__table__
BEATS: sa.Table = _models.TrialHeartbeatModel.__table__
INTERMEDIATE: sa.Table = _models.TrialIntermediateValueModel.__table__
VALUES: sa.Table = _models.TrialValueModel.__table__
DIRECTIONS: sa.Table = _models.StudyDirectionModel.__table__

# The system attribute prefix under which `optuna.artifacts.upload_artifact` records an artifact.
ARTIFACTS_ATTR_PREFIX: str = _ARTIFACTS_PREFIX
# The system attribute in which `Study.enqueue_trial` keeps a WAITING trial's values (its
# `params` stay empty until a worker asks for them).
FIXED_PARAMS = "fixed_params"


def intermediate_value(value: float | None, kind: Any) -> float:
    """An intermediate value as stored (`INTERMEDIATE` row: value and its type column) as Optuna
    reads it back (infinities and NaN are stored apart)."""
    return float(_models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(value, kind))


def trial_value(value: float | None, kind: Any) -> float:
    """A trial's value as stored (`VALUES` row: value and its type column) as Optuna reads it
    back (infinities are stored apart)."""
    return float(_models.TrialValueModel.stored_repr_to_value(value, kind))


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage the study object reads and writes through (load_study wraps an RDBStorage in
    a trial cache)."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def rdb(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage | None:
    """The RDBStorage under `storage` (under its trial cache, if any), or None."""
    backend = storage._backend if isinstance(storage, _CachedStorage) else storage
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def study_rdb(study: optuna.Study) -> optuna.storages.RDBStorage | None:
    return rdb(storage_of(study))


def remember_trial(study: optuna.Study, frozen: FrozenTrial) -> None:
    """Tell the study's trial cache about a trial written by our own SQL, as Optuna's
    `create_new_trial` does: the cache's parameter writes look the trial up there."""
    cache = storage_of(study)
    if isinstance(cache, _CachedStorage):
        with cache._lock:
            cache._studies.setdefault(study_id(study), _StudyInfo())
            cache._add_trials_to_cache(study_id(study), [frozen])


def forget_trials(study: optuna.Study) -> None:
    """Drop the study's per-thread list of trials, as `Study.ask` does, so sampling reads the
    study anew."""
    study._thread_local.cached_all_trials = None


def cached_trial(trial: optuna.Trial) -> FrozenTrial:
    """The trial's own copy of its record, which `trial.params` and `trial.user_attrs` read:
    written to after a write of ours so that the trial object shows it."""
    return trial._cached_frozen_trial


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Running trials of the study whose heartbeat is older than the grace period: what
    `fail_stale_trials` finds, without its failing and callback (the reaper does both in one
    transaction)."""
    backend = study_rdb(study)
    if backend is None:
        return []
    return list(backend._get_stale_trial_ids(study_id(study)))
