"""Optuna's private names that search/ relies on, checked one by one, so that an Optuna upgrade
breaks here, with a message naming the module to revisit, rather than somewhere in a worker.
(pyproject.toml pins the series the suite runs on; this is what a change of pin must pass.)"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

# The columns our SQL reads or writes, per Optuna table model.
COLUMNS = {
    "TrialModel": {"trial_id", "number", "study_id", "state", "datetime_start",
                   "datetime_complete"},
    "StudyModel": {"study_id", "study_name"},
    "TrialParamModel": {"trial_id", "param_name", "param_value", "distribution_json"},
    "TrialUserAttributeModel": {"trial_id", "key", "value_json"},
    "TrialSystemAttributeModel": {"trial_id", "key", "value_json"},
    "StudyUserAttributeModel": {"study_id", "key", "value_json"},
    "TrialHeartbeatModel": {"trial_id", "heartbeat"},
    "TrialIntermediateValueModel": {"trial_id", "step", "intermediate_value",
                                    "intermediate_value_type"},
    "TrialValueModel": {"trial_id", "objective", "value", "value_type"},
    "StudyDirectionModel": {"study_id", "objective", "direction"},
}


def _models() -> None:
    from optuna.storages._rdb import models

    for name, columns in COLUMNS.items():
        table = getattr(models, name).__table__
        missing = columns - set(table.c.keys())
        assert not missing, f"{name} lacks columns {sorted(missing)}"
    assert callable(models.TrialIntermediateValueModel.stored_repr_to_intermediate_value)
    assert callable(models.TrialValueModel.stored_repr_to_value)


def _cached_storage(tmp: Path) -> None:
    from optuna.storages._cached_storage import _CachedStorage, _StudyInfo

    study = optuna.create_study(storage=f"sqlite:///{tmp / 'c.db'}")
    cache = study._storage
    assert isinstance(cache, _CachedStorage)
    for attr in ("_studies", "_lock", "_backend", "_add_trials_to_cache",
                 "_read_trials_from_remote_storage"):
        assert hasattr(cache, attr), attr
    assert callable(_StudyInfo)


def _trial_and_study(tmp: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp / 't.db'}")
    trial = study.ask()
    assert trial._cached_frozen_trial.number == trial.number
    assert isinstance(trial._trial_id, int) and isinstance(study._study_id, int)
    assert hasattr(study._thread_local, "cached_all_trials")
    assert "use_cache" in inspect.signature(study._get_trials).parameters
    assert study._is_multi_objective() is False


def _stale_trials() -> None:
    params = inspect.signature(optuna.storages.RDBStorage._get_stale_trial_ids).parameters
    assert list(params) == ["self", "study_id"], list(params)


def _artifacts() -> None:
    from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX

    assert isinstance(ARTIFACTS_ATTR_PREFIX, str) and ARTIFACTS_ATTR_PREFIX


def _fixed_params() -> None:
    from search.db.optuna_private import FIXED_PARAMS

    study = optuna.create_study()
    study.enqueue_trial({"x": 0.5})
    (waiting,) = study.get_trials()
    assert waiting.params == {} and waiting.system_attrs[FIXED_PARAMS] == {"x": 0.5}


def _tpe() -> None:
    from optuna.samplers._tpe import sampler
    from optuna.search_space.group_decomposed import (
        _GroupDecomposedSearchSpace,
        _SearchSpaceGroup,
    )

    assert callable(sampler._get_infeasible_trial_score)
    assert callable(sampler._get_pruned_trial_score)
    assert callable(sampler.default_gamma)
    assert _GroupDecomposedSearchSpace and _SearchSpaceGroup
    tpe = optuna.samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=0)
    for attr in ("_sample", "_build_parzen_estimator", "_compute_acquisition_func", "_compare",
                 "_constant_liar", "_gamma", "_n_ei_candidates", "_rng",
                 "_group_decomposed_search_space", "_get_params"):
        assert hasattr(tpe, attr), attr
    assert list(inspect.signature(tpe._sample).parameters) == ["study", "trial", "search_space"]


def _median() -> None:
    assert optuna.pruners.MedianPruner(n_warmup_steps=3)._n_warmup_steps == 3


DOOR = "search/db/optuna_private.py"
SAMPLER = "search/runtime/algorithms.py"
CHECKS: dict[str, tuple[str, Callable[..., None]]] = {
    "table models": (DOOR, _models),
    "trial cache": (DOOR, _cached_storage),
    "trial and study": (f"{DOOR} and {SAMPLER}", _trial_and_study),
    "stale trials": (DOOR, _stale_trials),
    "artifact records": (DOOR, _artifacts),
    "enqueued values": (DOOR, _fixed_params),
    "TPE internals": (f"{SAMPLER} (TPESampler)", _tpe),
    "median pruner": (f"{SAMPLER} (MedianPruner)", _median),
}
# Optuna's private modules and attributes: reached only through the door (and the sampler
# module, which overrides TPE's private methods), so an upgrade is revisited in one place.
PRIVATE = re.compile(
    r"optuna\.storages\._|optuna\.artifacts\._|optuna\.samplers\._|_CachedStorage|_StudyInfo"
    r"|\.(_cached_frozen_trial|_get_stale_trial_ids|_thread_local|_study_id|_trial_id|_storage"
    r"|_backend|_n_warmup_steps|_get_trials|_is_multi_objective)\b"
)


def test_optuna_private_names_only_behind_the_door() -> None:
    root = Path(__file__).resolve().parents[2]
    outside = {}
    for path in sorted((root / "search").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in (DOOR, SAMPLER):
            continue
        hits = [f"{n}: {line.strip()}" for n, line in enumerate(path.read_text().splitlines(), 1)
                if PRIVATE.search(line) and not line.lstrip().startswith("#")]
        if hits:
            outside[rel] = hits
    assert not outside, f"Optuna private names outside {DOOR}: {outside}"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_private_optuna_names_we_use_still_exist(name: str, tmp_path: Path) -> None:
    revisit, check = CHECKS[name]
    try:
        check(tmp_path) if "tmp" in inspect.signature(check).parameters else check()
    except (AssertionError, AttributeError, ImportError, TypeError, ValueError) as e:
        pytest.fail(f"Optuna {optuna.__version__} changed {name} ({type(e).__name__}: {e});"
                    f" revisit {revisit}")
