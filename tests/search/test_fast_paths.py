"""The worker's fast paths behave as what they replace: its TPE sampler and median pruner decide
exactly as Optuna's (the same parameters and pruning decisions, trial by trial, with trials
overlapping, failing and queued), batched user attributes are stored as Optuna stores them, an
idle connection killed by the server is replaced before use, and a worker that never trains never
imports torch. On SQLite and PostgreSQL where a database is involved."""

from __future__ import annotations

import math
import subprocess
import sys

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState

from search.db.storage import ping_when_idle
from search.db.writes import set_user_attrs
from search.runtime import algorithms
from tests.helpers import ROOT, admin

EPOCHS = 6


def _study(storage: optuna.storages.RDBStorage, name: str, ours: bool) -> optuna.Study:
    tpe, median = ((algorithms.TPESampler, algorithms.MedianPruner) if ours
                   else (optuna.samplers.TPESampler, optuna.pruners.MedianPruner))
    warm: dict[str, list] = {"warm": []} if ours else {}  # an empty warm start is no warm start
    return optuna.create_study(
        storage=storage, study_name=name, direction="maximize",
        sampler=tpe(n_startup_trials=5, multivariate=True, group=True, constant_liar=True,
                    seed=7, **warm),
        pruner=median(n_startup_trials=3, n_warmup_steps=1),
    )


def _suggest(trial: optuna.Trial) -> dict[str, object]:
    params = {
        "lr": trial.suggest_float("lr", 1e-3, 1.0, log=True),
        "momentum": trial.suggest_float("momentum", 0.5, 0.99),
        "depth": trial.suggest_int("depth", 1, 8),
        "opt": trial.suggest_categorical("opt", ["sgd", "adamw", "nesterov"]),
    }
    if trial.number % 3 == 0:  # a parameter only some trials have: a second search-space group
        params["width"] = trial.suggest_float("width", 0.25, 2.0)
    return params


def _curve(params: dict[str, object], epoch: int) -> float:
    lr = float(params["lr"])  # type: ignore[arg-type]
    return math.exp(-(math.log10(lr) + 1.0) ** 2) * epoch / EPOCHS + 0.01 * int(params["depth"])


def test_same_decisions_as_optuna(storage_url: str) -> None:
    storage = optuna.storages.RDBStorage(storage_url)
    studies = [_study(storage, "optuna", ours=False), _study(storage, "ours", ours=True)]
    for study in studies:
        study.enqueue_trial({"lr": 0.1, "momentum": 0.9, "depth": 3, "opt": "sgd"})
    for round_ in range(30):
        # Two trials at once, so each is sampled while the other runs and the pruner sees a
        # study whose newest trials are still open.
        pairs = [[study.ask() for _ in range(2)] for study in studies]
        params = [[_suggest(t) for t in pair] for pair in pairs]
        assert params[0] == params[1], f"round {round_}: {params}"
        for k in range(2):
            outcomes = []
            for study, pair, ps in zip(studies, pairs, params, strict=True):
                trial, outcome = pair[k], "complete"
                if (round_ + k) % 7 == 3:
                    outcome = "fail"
                else:
                    for epoch in range(1, EPOCHS + 1):
                        trial.report(_curve(ps[k], epoch), epoch)
                        if epoch < EPOCHS and trial.should_prune():
                            outcome = f"pruned at {epoch}"
                            break
                outcomes.append(outcome)
                if outcome == "complete":
                    study.tell(trial, _curve(ps[k], EPOCHS))
                else:
                    study.tell(trial, state=TrialState.FAIL if outcome == "fail"
                               else TrialState.PRUNED)
            assert outcomes[0] == outcomes[1], f"round {round_} trial {k}: {outcomes}"
    states = [[t.state for t in s.get_trials()] for s in studies]
    assert states[0] == states[1]
    assert TrialState.PRUNED in states[0] and TrialState.COMPLETE in states[0]


def test_stub_worker_never_imports_torch() -> None:
    probe = ("import runpy, sys; sys.argv = ['stub', '--help'];\n"
             "try: runpy.run_module('tests.search.stub_worker', run_name='__main__')\n"
             "except SystemExit: pass\n"
             "import search.runtime.worker\n"
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_batched_user_attrs_are_stored_as_optuna_stores_them(storage_url: str) -> None:
    storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.create_study(storage=storage)
    attrs = {"config": {"lr": 0.1, "model": "resnet20"}, "epochs": [{"val_acc": 0.5}],
             "worker": "host:1#2", "peak_memory_mb": 1.5, "none": None}
    batched, plain = study.ask(), study.ask()
    set_user_attrs(batched, {"config": {}, "worker": "old"})  # overwritten below
    set_user_attrs(batched, attrs)
    for key, value in attrs.items():
        plain.set_user_attr(key, value)
    assert batched.user_attrs == attrs
    study.tell(batched, 1.0)
    study.tell(plain, 1.0)
    stored = [storage.get_trial(t._trial_id).user_attrs for t in (batched, plain)]
    assert stored[0] == stored[1] == attrs
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_user_attrs(batched, {"late": 1, "later": 2})


def test_idle_connection_killed_by_the_server_is_replaced(pg_url: str) -> None:
    engine = sa.create_engine(pg_url, pool_size=1, max_overflow=0)
    ping_when_idle(engine, idle_seconds=0.0)
    try:
        with engine.connect() as conn:
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        killer = admin()
        try:
            with killer.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
        finally:
            killer.close()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar() != pid
    finally:
        engine.dispose()


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_tpe_split_is_optunas(direction: str) -> None:
    """Below/above for every size of `below`, with ties, NaN and more pruned than complete."""
    from optuna.samplers._tpe.sampler import _split_trials

    study = optuna.create_study(direction=direction)
    dist = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for i in range(40):
        state = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED)[i % 3]
        steps = {s: [0.3, math.nan, float(i % 5)][i % 3] * s for s in range(1 + i % 4)}
        study.add_trial(optuna.create_trial(
            state=state, value=float(i % 7) if state == TrialState.COMPLETE else None,
            params={"x": (i % 10) / 10}, distributions=dist, intermediate_values=steps))
    study.enqueue_trial({"x": 0.5})
    study.ask()  # one running trial, which always goes above
    trials = study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    ours = algorithms.TPESampler(seed=0)
    for n_below in range(len(trials) + 2):
        got = ours._split(study, trials, n_below)
        want = _split_trials(study, trials, n_below)
        assert [[t.number for t in part] for part in got] == \
               [[t.number for t in part] for part in want], n_below


@pytest.mark.parametrize("ours", [False, True])
def test_one_read_of_the_study_per_ask(pg_url: str, ours: bool) -> None:
    """Each read of the study loads every unfinished trial with all its attributes, so its cost
    grows with the number of workers. Optuna's ask and TPE read it three times per trial (the
    waiting-trial look, the search space, the constant-liar sample of each parameter group); the
    worker's once."""
    from optuna.storages._cached_storage import _CachedStorage

    from search.db.writes import ask

    study = _study(optuna.storages.RDBStorage(pg_url), "reads", ours=ours)
    others = [study.ask() for _ in range(3)]  # running trials of other workers
    for t in others:
        _suggest(t)
    for t in [study.ask() for _ in range(6)]:
        study.tell(t, _curve(_suggest(t), EPOCHS))
    reads = []
    original = _CachedStorage._read_trials_from_remote_storage

    def counted(self: _CachedStorage, study_id: int) -> None:
        reads.append(study_id)
        original(self, study_id)

    _CachedStorage._read_trials_from_remote_storage = counted  # type: ignore[method-assign]
    try:
        for _ in range(3):
            trial = ask(study) if ours else study.ask()
            _suggest(trial)
            study.tell(trial, 0.5)
            assert len(reads) == 1 if ours else len(reads) >= 3, reads
            reads.clear()
    finally:
        _CachedStorage._read_trials_from_remote_storage = original  # type: ignore[method-assign]
    assert all(len(t.params) >= 4 for t in study.get_trials(states=(TrialState.COMPLETE,)))
