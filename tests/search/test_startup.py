"""Stratified start-up trials (`sampler = { stratified = true }`): a Latin hypercube over a
stage's parameters that every worker of the stage agrees on, then TPE."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.runtime import startup
from search.runtime.strategy import make_sampler
from search.space.spec import SpaceError, parse_space

SPACE = """
dataset = "digits"
[[stage]]
name = "optimizer"
trials = 12
epochs = 4
sampler = {sampler}
[stage.params]
lr = {{ low = 0.05, high = 2.0, log = true }}
batch_size = {{ choices = [64, 128, 256] }}
momentum = {{ low = 0.8, high = 0.95 }}
warmup_epochs = {{ low = 0, high = 3 }}
"""
STRATIFIED = "{ startup_trials = 4, stratified = true }"
DISTS = {"lr": FloatDistribution(0.05, 2.0, log=True),
         "batch_size": CategoricalDistribution((64, 128, 256)),
         "momentum": FloatDistribution(0.8, 0.95),
         "warmup_epochs": IntDistribution(0, 3)}


def _stage(sampler: str = STRATIFIED):  # type: ignore[no-untyped-def]
    return parse_space(tomllib.loads(SPACE.format(sampler=sampler)), "s.toml").stages[0]


def _position(name: str, value: float) -> float:
    """Where `value` lies in its range, 0..1, on the scale the stratification cuts."""
    dist = DISTS[name]
    assert isinstance(dist, FloatDistribution)
    if dist.log:
        return (math.log(value) - math.log(dist.low)) / (math.log(dist.high) - math.log(dist.low))
    return (value - dist.low) / (dist.high - dist.low)


def test_the_first_trials_take_each_stratum_of_each_parameter_once() -> None:
    for study in ("c10/optimizer", "other/optimizer", "eff-strat-s3/optimizer"):
        design = [{name: startup.sample(study, number, name, dist, 4)
                   for name, dist in DISTS.items()} for number in range(4)]
        for name in ("lr", "momentum"):
            # One value in each quarter of the range (of the log range for the rate).
            quarters = sorted(math.floor(_position(name, d[name]) * 4) for d in design)
            assert quarters == [0, 1, 2, 3], (study, name, design)
        # Three choices over four strata: each at least once, one twice.
        assert sorted({d["batch_size"] for d in design}) == [64, 128, 256]
        # Integers 0..3 over four strata: each once.
        assert sorted(d["warmup_epochs"] for d in design) == [0, 1, 2, 3]
        # Trial 4 starts a second round of the same strata (a retry during the start-up).
        again = startup.stratum(study, "lr", 4, 4)
        assert again == startup.stratum(study, "lr", 0, 4)


def test_the_design_depends_on_the_study_not_on_the_process() -> None:
    here = [startup.sample("c10/optimizer", n, "lr", DISTS["lr"], 4) for n in range(4)]
    # Another interpreter, with another salt for str hashes: the same values.
    code = ("import json; from optuna.distributions import FloatDistribution as F;"
            " from search.runtime import startup;"
            " print(json.dumps([startup.sample('c10/optimizer', n, 'lr',"
            " F(0.05, 2.0, log=True), 4) for n in range(4)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""},
                         cwd=Path(__file__).resolve().parents[2])
    assert json.loads(out.stdout) == here
    # Other studies order their strata otherwise (24 orders of 4 strata; 8 names all alike
    # would be a broken seed).
    orders = {tuple(startup.stratum(f"s{i}/optimizer", "lr", n, 4) for n in range(4))
              for i in range(8)}
    assert len(orders) > 1


@pytest.mark.parametrize(("dist", "values"), [
    (CategoricalDistribution(("a",)), {"a"}),
    (FloatDistribution(0.0, 0.3, step=0.1), {0.0, 0.1, 0.2, 0.3}),
    (IntDistribution(1, 1000, log=True), None),
])
def test_every_kind_of_range_stays_inside_it(dist, values) -> None:  # type: ignore[no-untyped-def]
    drawn = {startup.sample("s/x", n, "p", dist, 4) for n in range(4)}
    if values is not None:
        assert {round(v, 9) if isinstance(v, float) else v for v in drawn} <= values
        if len(values) == 4:  # four strata over four steps: each step once
            assert len(drawn) == 4
    else:
        assert all(1 <= v <= 1000 and isinstance(v, int) for v in drawn)
        assert len(drawn) == 4


def test_tpe_takes_its_start_up_from_the_strata_then_samples_itself() -> None:
    stage = _stage()
    study = optuna.create_study(study_name="c10/optimizer", direction="maximize",
                                sampler=make_sampler(stage, seed=1))
    # Two workers' worth: trials 0 and 1 sample before either finishes.
    first, second = study.ask(), study.ask()
    trials = [first, second]
    for trial in trials:
        for name, dist in DISTS.items():
            trial._suggest(name, dist)
    for trial in trials:
        study.tell(trial, 0.5)
    for _ in range(2):
        trial = study.ask()
        for name, dist in DISTS.items():
            trial._suggest(name, dist)
        study.tell(trial, 0.5)
    design = [{name: startup.sample("c10/optimizer", n, name, dist, 4)
               for name, dist in DISTS.items()} for n in range(4)]
    assert [t.params for t in study.trials] == design
    # Four trials finished: TPE's own proposal now, not a fifth stratified one.
    trial = study.ask()
    lr = trial._suggest("lr", DISTS["lr"])
    assert lr != startup.sample("c10/optimizer", 4, "lr", DISTS["lr"], 4)


def test_without_the_key_the_start_up_is_random_and_the_digest_unchanged() -> None:
    plain = parse_space(tomllib.loads(SPACE.format(sampler="{ startup_trials = 4 }")), "s.toml")
    assert not plain.stages[0].sampler.stratified
    assert json.loads(plain.to_json())["stage"][0]["sampler"] == {"startup_trials": 4}
    stratified = parse_space(tomllib.loads(SPACE.format(sampler=STRATIFIED)), "s.toml")
    assert json.loads(stratified.to_json())["stage"][0]["sampler"] == {
        "startup_trials": 4, "stratified": True}
    assert stratified.digest() != plain.digest()
    assert type(plain).from_json(stratified.to_json()).stages[0].sampler.stratified
    study = optuna.create_study(study_name="c10/optimizer",
                                sampler=make_sampler(plain.stages[0], seed=1))
    trial = study.ask()
    assert trial._suggest("lr", DISTS["lr"]) != startup.sample(
        "c10/optimizer", 0, "lr", DISTS["lr"], 4)


@pytest.mark.parametrize(("sampler", "named"), [
    ('{ stratified = "yes" }', "sampler.stratified: expected true or false, got 'yes'"),
    ("{ stratifed = true }", "sampler.stratifed: unknown key; did you mean stratified?"),
    ("{ startup_trials = -1 }", "sampler.startup_trials: must be at least 0"),
    ("[1]", "sampler: expected a table"),
])
def test_bad_sampler_settings_name_the_field(sampler: str, named: str) -> None:
    with pytest.raises(SpaceError, match="s.toml: stage 'optimizer': " + named):
        parse_space(tomllib.loads(SPACE.format(sampler=sampler)), "s.toml")
