"""Warm starts (`warm_start`, `cycles`, `joint`): the earlier trials chosen are exactly those that
share the stage's base, TPE reads them in memory (it samples differently, from the first trial,
and writes nothing of them), a pipeline with a second pass and a joint stage runs end to end
with stub workers, each stage spending exactly its budget, and a `[screen]` runs first, the stages
opening from its best."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from search.db import pipeline, registry
from search.db.storage import open_storage
from search.runtime import algorithms, strategy
from search.space.params import distribution, in_range
from search.space.spec import WORKER_OWNED, Pipeline, load_space, parse_space
from tests.helpers import hpo, start_stub_worker, write_space
from trainer.config import TrainConfig

DEFAULT_WD = TrainConfig.weight_decay


def config(**values: Any) -> dict[str, Any]:
    """A trial's recorded configuration, as the worker writes it."""
    full = {**TrainConfig().to_dict(), "dataset": "digits", **values}
    return {k: v for k, v in full.items() if k not in WORKER_OWNED}


def lr_space(**extra: Any) -> dict[str, Any]:
    return {
        "dataset": "digits",
        "stage": [
            {"name": "a", "trials": 9, "epochs": 1,
             "params": {"lr": {"low": 0.001, "high": 1.0, "log": True}}},
            {"name": "b", "trials": 9, "epochs": 1,
             "params": {"weight_decay": {"low": 1e-5, "high": 1e-3, "log": True}}},
            {"name": "c", "trials": 9, "epochs": 1, "warm_start": True,
             "params": {"lr": {"low": 0.01, "high": 0.5, "log": True}}},
        ],
        **extra,
    }


def add(study: optuna.Study, value: float | None, params: dict[str, float], cfg: dict | None,
        state: TrialState = TrialState.COMPLETE) -> None:
    dists = {k: FloatDistribution(1e-6, 1.0, log=True) for k in params}
    study.add_trial(optuna.create_trial(
        state=state, value=value, params=params, distributions=dists,
        user_attrs={} if cfg is None else {"config": cfg}))


def test_the_warm_trials_are_those_that_share_the_stages_base(tmp_path: Path) -> None:
    """Stage c searches lr from a base of weight_decay = the default: stage a's trials (the
    default weight decay) qualify when their lr lies in c's range; stage b's only where it
    tried the default weight decay; pruned and failed trials and trials without a recorded
    configuration never."""
    pipe = parse_space(lr_space(joint={"trials": 2, "epochs": 1}), "w.toml")
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", create_schema=True)
    pipeline.create(storage, "w", pipe, "w.toml")
    a, b = (pipeline.load_stage_study(storage, "w", s) for s in pipe.stages[:2])
    add(a, 0.5, {"lr": 0.05}, config(lr=0.05))  # a#0: in
    add(a, 0.6, {"lr": 0.9}, config(lr=0.9))  # a#1: lr outside c's range
    add(a, 0.7, {"lr": 0.2}, config(lr=0.2))  # a#2: in
    add(a, None, {"lr": 0.1}, config(lr=0.1), TrialState.PRUNED)  # a#3
    add(a, None, {"lr": 0.1}, config(lr=0.1), TrialState.FAIL)  # a#4
    add(a, 0.8, {"lr": 0.1}, None)  # a#5: no recorded configuration
    add(b, 0.8, {"weight_decay": 1e-4}, config(lr=0.2, weight_decay=1e-4))  # b#0: other base
    add(b, 0.9, {"weight_decay": DEFAULT_WD}, config(lr=0.2, weight_decay=DEFAULT_WD))  # b#1: in

    warm = pipeline.warm_trials(storage, "w", pipe, 2, {"lr": 0.2})
    assert [(t.user_attrs["warm_from"], t.params, t.value) for t in warm] == [
        ({"stage": "a", "trial": 0}, {"lr": 0.05}, 0.5),
        ({"stage": "a", "trial": 2}, {"lr": 0.2}, 0.7),
        ({"stage": "b", "trial": 1}, {"lr": 0.2}, 0.9),
    ]
    assert [(t.number, t._trial_id) for t in warm] == [(-3, -3), (-2, -2), (-1, -1)]
    c = pipe.stage("c")
    assert all(t.distributions == {"lr": distribution(c.params["lr"])} for t in warm)
    assert all(t.state == TrialState.COMPLETE for t in warm)
    # From a base of weight decay 1e-4 only b#0 qualifies.
    got = pipeline.warm_trials(storage, "w", pipe, 2, {"lr": 0.2, "weight_decay": 1e-4})
    assert [t.user_attrs["warm_from"] for t in got] == [{"stage": "b", "trial": 0}]
    # The joint stage searches everything: every recorded complete trial whose values lie in its
    # ranges (lr by c's, the last definition; weight decay by b's).
    joint = pipeline.warm_trials(storage, "w", pipe, 3, {"lr": 0.2})
    assert [(t.user_attrs["warm_from"]["stage"], t.user_attrs["warm_from"]["trial"])
            for t in joint] == [("a", 0), ("a", 2), ("b", 0), ("b", 1)]
    assert joint[2].params == {"lr": 0.2, "weight_decay": 1e-4}
    assert pipeline.warm_trials(storage, "w", pipe, 0, {}) == []
    assert len(pipe.stage("c").params) == 1 and len(a.get_trials()) == 6  # nothing written


def _curve(lr: float) -> float:
    return math.exp(-(math.log10(lr) + 1.0) ** 2)


def _warm(n: int) -> list[FrozenTrial]:
    dist = FloatDistribution(1e-3, 1.0, log=True)
    out = []
    for i in range(n):
        lr = 10 ** (-3 + 3 * (i + 0.5) / n)
        out.append(FrozenTrial(
            number=i - n, trial_id=i - n, state=TrialState.COMPLETE, value=_curve(lr),
            values=None, datetime_start=None, datetime_complete=None, params={"lr": lr},
            distributions={"lr": dist}, user_attrs={}, system_attrs={}, intermediate_values={}))
    return out


def _lrs(sampler: optuna.samplers.BaseSampler, url: str, name: str, n: int) -> list[float]:
    study = optuna.create_study(storage=url, study_name=name, direction="maximize",
                                sampler=sampler)
    out = []
    for _ in range(n):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        study.tell(trial, _curve(lr))
        out.append(lr)
    assert [t.number for t in study.trials] == list(range(n))  # only its own trials
    return out


def test_tpe_reads_the_warm_trials_from_its_first_sample(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    kwargs: dict[str, Any] = dict(n_startup_trials=10, multivariate=True, group=True,
                                  constant_liar=True, seed=3)
    cold = _lrs(algorithms.TPESampler(**kwargs), url, "cold", 6)
    empty = _lrs(algorithms.TPESampler(**kwargs, warm=[]), url, "empty", 6)
    optunas = _lrs(optuna.samplers.TPESampler(**kwargs), url, "optuna", 6)
    warm = _lrs(algorithms.TPESampler(**kwargs, warm=_warm(12)), url, "warm", 6)
    assert cold == empty == optunas  # warm=[]: Optuna's TPE, random start-up included
    assert warm != cold
    # Twelve warm trials cover the start-up: TPE proposes within a decade of the warm trials'
    # best (lr 0.1) at once, where the cold sampler's random start-up lands anywhere in
    # [0.001, 1] (for this seed, more than a decade away).
    decades = [[abs(math.log10(lr) + 1) for lr in lrs] for lrs in (warm, cold)]
    assert max(decades[0]) < 1 < max(decades[1]), decades


@pytest.mark.parametrize(("change", "message"), [
    ({"trial_id": 0}, "negative trial ids"),
    ({"state": TrialState.PRUNED, "value": None}, "complete"),
])
def test_warm_trials_must_be_complete_with_negative_ids(change: dict, message: str) -> None:
    trial = _warm(1)[0]
    bad = FrozenTrial(**{
        "number": trial.number, "trial_id": trial._trial_id, "state": trial.state,
        "value": trial.value, "values": None, "datetime_start": None, "datetime_complete": None,
        "params": trial.params, "distributions": trial.distributions, "user_attrs": {},
        "system_attrs": {}, "intermediate_values": {}, **change})
    with pytest.raises(ValueError, match=message):
        algorithms.TPESampler(multivariate=True, group=True, warm=[bad])


def test_a_finite_stage_passes_its_warm_trials_to_tpe() -> None:
    pipe = Pipeline.from_json(parse_space({"dataset": "digits", "stage": [{
        "name": "s", "trials": 4, "epochs": 1,
        "params": {"width": {"choices": [0.5, 1.0]}}}]}, "f.toml").to_json())
    sampler = strategy.make_sampler(pipe.stages[0], seed=0, warm=_warm(2))
    assert isinstance(sampler, strategy.Deduplicating)
    assert sampler.base._warm == _warm(2)  # type: ignore[attr-defined]


CYCLIC = """
    dataset = "digits"
    cycles = 2
    [[stage]]
    name = "optimizer"
    trials = {trials1}
    epochs = 2
    pruner = {{ type = "none" }}
    sampler = {{ startup_trials = 2 }}
    [stage.params]
    lr = {{ low = 0.001, high = 1.0, log = true }}
    [[stage]]
    name = "regularization"
    trials = {trials2}
    epochs = 2
    pruner = {{ type = "none" }}
    sampler = {{ startup_trials = 2 }}
    [stage.params]
    weight_decay = {{ low = 0.00001, high = 0.01, log = true }}
    [joint]
    trials = {joint}
    epochs = 2
    pruner = {{ type = "none" }}
    sampler = {{ startup_trials = 2 }}
"""
WARM_LOG = re.compile(r"stage (\S+): TPE warm-started with (\d+) earlier trials")


def _expected_warm(storage: optuna.storages.RDBStorage, pipe: Pipeline, index: int) -> int:
    """Counted here from the stored trials, the rule written out: every other searched field
    equal to the value the stage opened with (carried, else the default), own values in range."""
    stage = pipe.stages[index]
    opened = registry.get_stage(storage.engine, "cyc", stage.name)
    assert opened is not None
    searched = {k for s in pipe.stages for k in s.params}
    base = {k: opened.carried.get(k, getattr(TrainConfig(), k)) for k in searched}
    n = 0
    for earlier in pipe.stages[:index]:
        for t in pipeline.load_stage_study(storage, "cyc", earlier).get_trials(
                states=(TrialState.COMPLETE,)):
            cfg = t.user_attrs["config"]
            same = all(cfg[k] == base[k] for k in searched - set(stage.params))
            inside = True
            for k, p in stage.params.items():
                try:
                    in_range(p, cfg[k])
                except ValueError:
                    inside = False
            n += same and inside
    return n


def test_two_passes_and_a_joint_stage_run_to_the_end(storage_url: str, tmp_path: Path) -> None:
    space = write_space(tmp_path / "cyc.toml", CYCLIC.format(trials1=4, trials2=3, joint=3))
    created = hpo("create", "--space", str(space), "--study", "cyc", url=storage_url,
                  cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [start_stub_worker("cyc", url=storage_url, cwd=tmp_path, log=log) for log in logs]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]

    storage = open_storage(storage_url)
    pipe = pipeline.load(storage, "cyc")
    assert [s.name for s in pipe.stages] == [
        "optimizer", "regularization", "optimizer-2", "regularization-2", "joint"]
    budgets = [4, 3, 4, 3, 3]
    for stage, want in zip(pipe.stages, budgets, strict=True):
        trials = pipeline.load_stage_study(storage, "cyc", stage).get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * want, stage.name
    # What every worker that opened a warm stage started its TPE from.
    seen: dict[str, set[int]] = {}
    for log in logs:
        for stage_name, n in WARM_LOG.findall(log.read_text()):
            seen.setdefault(stage_name, set()).add(int(n))
    expected = {pipe.stages[i].name: _expected_warm(storage, pipe, i) for i in range(2, 5)}
    assert seen == {name: {n} for name, n in expected.items()}, (seen, expected)
    # The regularization stage only ties (the stub's accuracy depends on lr alone), so the second
    # pass of the optimizer opens from the first pass's best, at the default weight decay that
    # all of the first pass's trials ran with; the joint stage reads every earlier trial.
    assert expected["optimizer-2"] == 4
    assert expected["joint"] == sum(budgets[:4])
    status = hpo("status", "cyc", url=storage_url, cwd=tmp_path)
    assert status.returncode == 0 and "joint" in status.stdout, status.stderr


SCREENED = CYCLIC.replace("    cycles = 2\n", "    [screen]\n    trials = 5\n    epochs = 2\n"
                          '    pruner = {{ type = "none" }}\n'
                          "    sampler = {{ startup_trials = 2 }}\n").split("    [joint]")[0]


def test_a_screen_runs_first_and_the_stages_open_from_its_best(storage_url: str,
                                                               tmp_path: Path) -> None:
    space = write_space(tmp_path / "scr.toml", SCREENED.format(trials1=3, trials2=3))
    created = hpo("create", "--space", str(space), "--study", "scr", url=storage_url,
                  cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    log = tmp_path / "w.log"
    code = start_stub_worker("scr", url=storage_url, cwd=tmp_path, log=log).wait(timeout=600)
    assert code == 0, log.read_text()[-3000:]

    storage = open_storage(storage_url)
    pipe = pipeline.load(storage, "scr")
    assert [s.name for s in pipe.stages] == ["screen", "optimizer", "regularization"]
    studies = [pipeline.load_stage_study(storage, "scr", s) for s in pipe.stages]
    assert [len(s.get_trials(states=(TrialState.COMPLETE,))) for s in studies] == [5, 3, 3]
    # The screen searched both parameters at once; the optimizer stage opened from its best,
    # keeping the weight decay the best screen trial ran with.
    screen_best = studies[0].best_trial
    assert set(screen_best.params) == {"lr", "weight_decay"}
    opened = registry.get_stage(storage.engine, "scr", "optimizer")
    assert opened is not None
    assert opened.carried == screen_best.params
    assert {t.user_attrs["config"]["weight_decay"] for t in studies[1].get_trials()} == {
        screen_best.params["weight_decay"]}
    status = hpo("status", "scr", url=storage_url, cwd=tmp_path)
    assert status.returncode == 0 and "screen" in status.stdout, status.stderr


def test_the_cifar_files_last_stage_reads_the_first_regularization_stages_trials(
    tmp_path: Path
) -> None:
    """spaces/cifar10-resnet.toml searches regularization before and after the architecture; the
    second stage, which also searches distillation, is warm-started with the first one's trials
    when the architecture stage kept the base architecture (their distillation values at the
    trainer's defaults, inside its ranges), and with none of a trial on another architecture."""
    pipe = load_space(Path(__file__).parents[2] / "spaces" / "cifar10-resnet.toml")
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", create_schema=True)
    pipeline.create(storage, "c10", pipe, "cifar10-resnet.toml")
    optimizer = {"lr": 0.1, "batch_size": 128, "momentum": 0.9, "warmup_epochs": 1.0}
    architecture = {"model": "resnet20", "width": TrainConfig.width, "se": False}
    regularization = pipeline.load_stage_study(storage, "c10", pipe.stage("regularization"))
    for value, reg, arch in [(0.91, {"label_smoothing": 0.1, "weight_decay": 5e-4,
                                     "dropout": 0.1}, architecture),
                             (0.92, {"label_smoothing": 0.05, "weight_decay": 1e-4,
                                     "dropout": 0.2}, {**architecture, "width": 2.0})]:
        add(regularization, value, reg,
            config(dataset="cifar10", **optimizer, **reg, **arch))
    index = [s.name for s in pipe.stages].index("regularization-2")
    carried = {**optimizer, "label_smoothing": 0.1, "weight_decay": 5e-4, "dropout": 0.1,
               **architecture}
    warm = pipeline.warm_trials(storage, "c10", pipe, index, carried)
    assert [(t.value, t.params) for t in warm] == [
        (0.91, {"label_smoothing": 0.1, "weight_decay": 5e-4, "dropout": 0.1,
                "kd_temperature": TrainConfig.kd_temperature, "kd_alpha": 0.0})]
