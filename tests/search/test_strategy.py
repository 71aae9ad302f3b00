"""A stage's pruner and sampler from its space file: the pruner types and their checks, finite
spaces trained once per configuration, and a stage closed early when its space is exhausted."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.db import pipeline
from search.db.storage import open_storage
from search.runtime.strategy import Deduplicating, make_pruner, make_sampler
from search.space import grid
from search.space.params import CategoricalParam, FloatParam, IntParam
from search.space.spec import Pipeline, SpaceError, parse_space
from tests.helpers import hpo, run_stub_study, start_stub_worker, write_space

STAGE = """
dataset = "digits"
[[stage]]
name = "s"
trials = {trials}
epochs = {epochs}
{pruner}
sampler = {{ startup_trials = {startup} }}
[stage.params]
{params}
"""


def _space(*, trials: int = 8, epochs: int = 9, pruner: str = "", startup: int = 10,
           params: str = "lr = { choices = [0.01, 0.03, 0.1, 0.3] }") -> str:
    return STAGE.format(trials=trials, epochs=epochs, pruner=pruner, startup=startup,
                        params=params)


def _parse(text: str):  # type: ignore[no-untyped-def]
    return parse_space(tomllib.loads(text), "s.toml")


@pytest.mark.parametrize(("pruner", "kind"), [
    ("", optuna.pruners.MedianPruner),
    ('pruner = { type = "hyperband", min_epochs = 1, reduction_factor = 3 }',
     optuna.pruners.HyperbandPruner),
    ('pruner = { type = "successive_halving", min_epochs = 2 }',
     optuna.pruners.SuccessiveHalvingPruner),
    ('pruner = { type = "none" }', optuna.pruners.NopPruner),
])
def test_each_pruner_type_builds_optunas_pruner(pruner: str, kind: type) -> None:
    pipe = _parse(_space(pruner=pruner))
    assert isinstance(make_pruner(pipe.stages[0]), kind)
    assert Pipeline.from_json(pipe.to_json()).stages[0].pruner == pipe.stages[0].pruner


def test_a_median_pruner_keeps_the_digest_of_files_from_before_pruner_types() -> None:
    pipe = _parse(_space(pruner="pruner = { startup_trials = 3, warmup_epochs = 1 }"))
    stored = json.loads(pipe.to_json())["stage"][0]["pruner"]
    assert stored == {"startup_trials": 3, "warmup_epochs": 1}
    typed = _parse(_space(pruner='pruner = { type = "median", startup_trials = 3,'
                                 " warmup_epochs = 1 }"))
    assert typed.digest() == pipe.digest()


@pytest.mark.parametrize(("pruner", "named"), [
    ('pruner = { type = "asha" }', "pruner.type: 'asha' is not one of median, hyperband"),
    ('pruner = { type = "hyperband", warmup_epochs = 2 }', "pruner.warmup_epochs: unknown key"),
    ('pruner = { type = "hyperband", reduction_factor = 1 }',
     "pruner.reduction_factor: must be at least 2"),
    ('pruner = { type = "successive_halving", min_epochs = 10 }',
     "pruner.min_epochs: must be between 1 and the stage's 9 epochs"),
    ('pruner = { type = "none", startup_trials = 1 }', "pruner.startup_trials: unknown key"),
])
def test_bad_pruner_settings_name_the_field(pruner: str, named: str) -> None:
    with pytest.raises(SpaceError, match="s.toml: stage 's': " + named.replace("(", r"\(")):
        _parse(_space(pruner=pruner))


def test_grid_sizes() -> None:
    assert grid.size({"a": CategoricalParam(("x", "y")), "b": IntParam(1, 5, step=2)}) == 6
    assert grid.size({"c": FloatParam(0.0, 0.3, step=0.1)}) == 4
    assert grid.size({"d": FloatParam(0.001, 0.1, log=True)}) is None  # a continuum
    assert grid.size({}) is None
    configs = grid.configurations({"a": CategoricalParam(("x", "y")), "c": FloatParam(0, 0.2,
                                                                                      step=0.1)})
    assert configs is not None and len(configs) == 6
    assert len({grid.key(c) for c in configs}) == 6


@pytest.mark.parametrize("startup", [0, 100], ids=["tpe", "random start-up"])
def test_the_sampler_proposes_no_configuration_twice(startup: int) -> None:
    stage = _parse(_space(startup=startup, params=(
        'lr = { choices = [0.01, 0.1] }\nbatch_size = { choices = [32, 64, 128] }'))).stages[0]
    sampler = make_sampler(stage, seed=7)
    assert isinstance(sampler, Deduplicating)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    for _ in range(6):
        trial = study.ask()
        lr, bs = trial.suggest_categorical("lr", [0.01, 0.1]), \
            trial.suggest_categorical("batch_size", [32, 64, 128])
        study.tell(trial, lr * 10 + bs / 1000)  # TPE would keep proposing the best one
    seen = [grid.key(t.params) for t in study.trials]
    assert len(set(seen)) == 6, seen


def test_a_finite_stage_trains_each_configuration_once_and_closes_early(
    storage_url: str, tmp_path: Path
) -> None:
    """Four configurations and a budget of eight: two workers train each once, then the stage
    closes, and `hpo status` says why it spent half its budget."""
    space = write_space(tmp_path / "f.toml", _space(trials=8, epochs=2, startup=0))
    assert hpo("create", "--space", str(space), "--study", "f", url=storage_url,
               cwd=tmp_path).returncode == 0
    procs = [start_stub_worker("f", url=storage_url, cwd=tmp_path, log=tmp_path / f"w{i}.log")
             for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(2)]
    storage = open_storage(storage_url)
    study = pipeline.load_stage_study(storage, "f", pipeline.load(storage, "f").stages[0])
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == [0.01, 0.03, 0.1, 0.3]
    # Two workers that sampled the same untried configuration at once: the second to reserve it
    # is failed as a duplicate before training (no epoch reported), giving its slot back.
    others = [t for t in trials if t.state != TrialState.COMPLETE]
    assert all(t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "duplicate"
               and not t.intermediate_values for t in others), others
    info = json.loads(hpo("status", "f", "--json", url=storage_url, cwd=tmp_path).stdout)
    assert info["stages"][0]["exhausted"] and info["stages"][0]["closed"]
    text = hpo("status", "f", url=storage_url, cwd=tmp_path).stdout
    assert "s closed early: all 4 configurations of its space were trained" in text, text


def test_a_hyperband_stage_prunes_and_spends_exactly_its_budget(
    pg_url: str, tmp_path: Path
) -> None:
    space = write_space(tmp_path / "h.toml", _space(
        trials=12, epochs=9, startup=100, params="lr = { low = 0.0001, high = 1.0, log = true }",
        pruner='pruner = { type = "hyperband", min_epochs = 1, reduction_factor = 3 }'))
    assert hpo("create", "--space", str(space), "--study", "h", url=pg_url,
               cwd=tmp_path).returncode == 0
    worker = start_stub_worker("h", url=pg_url, cwd=tmp_path, log=tmp_path / "w.log")
    assert worker.wait(timeout=600) == 0, (tmp_path / "w.log").read_text()[-2000:]
    storage = open_storage(pg_url)
    study = pipeline.load_stage_study(storage, "h", pipeline.load(storage, "h").stages[0])
    trials = study.get_trials()
    states = [t.state for t in trials]
    assert len(trials) == 12 and TrialState.FAIL not in states
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "random learning rates over four decades: some trial falls below a rung"
    assert all(max(t.intermediate_values) < 9 for t in pruned)
    assert all(max(t.intermediate_values) == 9 for t in trials if t.state == TrialState.COMPLETE)


def test_a_configuration_is_reserved_by_one_trial_at_a_time(pg_url: str) -> None:
    from search.db.writes import reserve

    study = optuna.create_study(storage=open_storage(pg_url, create_schema=True))
    first, second = study.ask(), study.ask()
    key = grid.key({"lr": 0.1})
    assert reserve(study, first, key) is None
    assert reserve(study, first, key) is None  # a retry after a lost reply: still its own
    assert reserve(study, second, key) == first.number
    study.tell(first, state=TrialState.FAIL)  # a failed trial holds nothing
    assert reserve(study, second, key) is None
    assert reserve(study, study.ask(), key) == second.number


CARRIED = """
dataset = "digits"
[fixed]
width = 0.5
[[stage]]
name = "opt"
trials = 2
epochs = 2
sampler = {{ startup_trials = 10 }}
[stage.params]
lr = {{ choices = [0.01, 0.1] }}
[[stage]]
name = "arch"
trials = 4
epochs = {epochs}
sampler = {{ startup_trials = 10 }}
[stage.params]
width = {{ choices = [0.25, 0.5, 1.0] }}
"""


@pytest.mark.parametrize("epochs", [2, 3], ids=["same training", "longer trials"])
def test_a_finite_stage_does_not_train_again_the_configuration_it_carried_in(
    storage_url: str, tmp_path: Path, epochs: int
) -> None:
    """The second stage starts from width 0.5 (its [fixed] value), which the first stage's best
    trial trained. With the same epochs that trial's result is the stage's for width 0.5: it
    trains the other two widths and closes. With longer trials it is a different training, and
    the stage trains all three."""
    run_stub_study(write_space(tmp_path / "c.toml", CARRIED.format(epochs=epochs)), "c",
                   url=storage_url, cwd=tmp_path)
    storage = open_storage(storage_url)
    pipe = pipeline.load(storage, "c")
    arch = pipeline.load_stage_study(storage, "c", pipe.stages[1]).get_trials()
    widths = sorted(t.params["width"] for t in arch)
    assert all(t.state == TrialState.COMPLETE for t in arch), arch
    info = json.loads(hpo("status", "c", "--json", url=storage_url, cwd=tmp_path).stdout)
    text = hpo("status", "c", url=storage_url, cwd=tmp_path).stdout
    assert info["stages"][1]["exhausted"] and info["stages"][1]["closed"]
    if epochs == 2:
        assert widths == [0.25, 1.0]
        assert ("arch closed early: all 3 configurations of its space were trained, the one it"
                " carried in by an earlier stage") in text, text
    else:
        assert widths == [0.25, 0.5, 1.0]
        assert "arch closed early: all 3 configurations of its space were trained" in text
        assert "carried in by an earlier stage" not in text, text


def test_the_configuration_a_stage_carried_in_is_not_trained_when_a_user_queues_it(
    storage_url: str, tmp_path: Path
) -> None:
    """Queued before the stage opens, width 0.5 (what arch carries in, trained by opt with the
    same epochs and seed) reaches the worker, which fails it untrained as a duplicate; queued
    after, `hpo enqueue` refuses it and writes nothing."""
    space = write_space(tmp_path / "c.toml", CARRIED.format(epochs=2))
    assert hpo("create", "--space", str(space), "--study", "c", url=storage_url,
               cwd=tmp_path).returncode == 0
    carried = json.dumps({"width": 0.5})
    early = hpo("enqueue", "c", "--stage", "arch", "--params", carried, url=storage_url,
                cwd=tmp_path)
    assert early.returncode == 0, early.stderr  # the stage has not opened: nothing to compare
    log = tmp_path / "worker.log"
    worker = start_stub_worker("c", url=storage_url, cwd=tmp_path, log=log)
    assert worker.wait(timeout=600) == 0, log.read_text()[-3000:]
    storage = open_storage(storage_url)
    study = pipeline.load_stage_study(storage, "c", pipeline.load(storage, "c").stages[1])
    arch = study.get_trials()
    queued = [t for t in arch if t.user_attrs.get("enqueued_by") == "user"]
    assert len(queued) == 1 and queued[0].state == TrialState.FAIL
    assert queued[0].user_attrs["fail_reason"] == "duplicate"
    assert "epochs" not in queued[0].user_attrs  # never trained
    assert sorted(t.params["width"] for t in arch if t.state == TrialState.COMPLETE) == [0.25, 1.0]

    late = hpo("enqueue", "c", "--stage", "arch", "--params", carried, url=storage_url,
               cwd=tmp_path)
    assert late.returncode == 2
    assert ("stage 'arch' trains each configuration once, and it carried {\"width\": 0.5} in"
            " from trial #") in late.stderr, late.stderr
    assert len(study.get_trials()) == len(arch)
