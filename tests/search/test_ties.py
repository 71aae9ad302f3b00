"""Ties (`ties` in a space file): which of equal-valued complete trials is best, in every place
that decides it: `pipeline.best_trial` and `best_of` (what the next stage carries, the winner)
and a stage's standing (`StageStatus.not_beaten`)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from search.db import pipeline
from search.db.storage import open_storage
from search.results.best import best, stage_status
from search.space.spec import parse_space

LR = FloatDistribution(0.001, 1.0, log=True)


def trial(number: int, value: float | None, *, state: TrialState = TrialState.COMPLETE,
          **user_attrs: Any) -> FrozenTrial:
    now = datetime.datetime.now()
    return FrozenTrial(
        number=number, state=state, value=value, values=None, datetime_start=now,
        datetime_complete=now, params={"lr": 0.1}, distributions={"lr": LR},
        user_attrs=user_attrs, system_attrs={}, intermediate_values={}, trial_id=number + 1)


def loss(value: float) -> dict[str, Any]:
    return {"metrics": {"val_loss": value}}


TRIALS = [trial(0, 0.9, **loss(0.1)), trial(1, 0.95, **loss(0.4)), trial(2, 0.95, **loss(0.2)),
          trial(3, 0.95, **loss(0.2)), trial(4, 0.97, state=TrialState.PRUNED),
          trial(5, None, state=TrialState.FAIL), trial(6, 0.9, **loss(0.0))]


@pytest.mark.parametrize(("ties", "winner"), [("earlier", 1), ("later", 3), ("val_loss", 2)])
def test_best_trial_breaks_ties_as_told(ties: str, winner: int) -> None:
    found = pipeline.best_trial(TRIALS, "maximize", ties, "val_acc")
    assert found is not None and found.number == winner


@pytest.mark.parametrize(("ties", "winner"), [("earlier", 0), ("later", 6), ("val_loss", 6)])
def test_minimizing_ties_too(ties: str, winner: int) -> None:
    found = pipeline.best_trial(TRIALS, "minimize", ties, "val_acc")
    assert found is not None and found.number == winner


def test_val_loss_comes_from_the_result_or_the_best_epoch_else_loses() -> None:
    epochs = [{"val_acc": 0.5, "val_loss": 0.05}, {"val_acc": 0.95, "val_loss": 0.3}]
    from_epochs = trial(1, 0.95, epochs=epochs)
    recorded = trial(2, 0.95, **loss(0.25))
    unknown = trial(3, 0.95)
    assert pipeline.val_loss(from_epochs, "val_acc") == 0.3  # the best epoch's, not the lowest
    assert pipeline.val_loss(unknown, "val_acc") == float("inf")
    assert pipeline.better(recorded, from_epochs, "maximize", "val_loss", "val_acc")
    assert not pipeline.better(unknown, recorded, "maximize", "val_loss", "val_acc")
    assert pipeline.better(from_epochs, unknown, "maximize", "val_loss", "val_acc")
    # An equal loss keeps the earlier one; a better value wins whatever the loss.
    assert not pipeline.better(trial(4, 0.95, **loss(0.25)), recorded, "maximize", "val_loss")
    assert pipeline.better(trial(5, 0.96, **loss(9.0)), recorded, "maximize", "earlier")
    assert not pipeline.better(trial(6, 0.94, **loss(0.0)), recorded, "maximize", "later")


SPACE = {
    "dataset": "digits",
    "stage": [{"name": "a", "trials": 2, "epochs": 1, "params": {"lr": {"low": 0.001,
                                                                      "high": 1.0}}},
              {"name": "b", "trials": 2, "epochs": 1,
               "params": {"weight_decay": {"low": 1e-5, "high": 1e-3}}}],
}


@pytest.mark.parametrize(("ties", "carried_from", "not_beaten"), [
    ("earlier", "a", True), ("later", "b", False), ("val_loss", "b", False)])
def test_the_stage_that_ties_carries_its_own_configuration_when_told(
    tmp_path: Path, ties: str, carried_from: str, not_beaten: bool
) -> None:
    """Stage b's best ties stage a's, with a lower validation loss: by default b did not beat a
    and a stays the winner; with `later` or `val_loss` b's trial wins, and the next stage would
    carry it."""
    pipe = parse_space({**SPACE, "ties": ties}, "t.toml")
    storage = open_storage(f"sqlite:///{tmp_path / 'hpo.db'}", create_schema=True)
    pipeline.create(storage, "t", pipe, "t.toml")
    for stage, wd, val_loss in [(pipe.stages[0], None, 0.3), (pipe.stages[1], 1e-4, 0.2)]:
        study = pipeline.load_stage_study(storage, "t", stage)
        params = {"weight_decay": wd} if wd else {"lr": 0.1}
        dists = {k: optuna.distributions.FloatDistribution(1e-5, 1.0) for k in params}
        config = {"lr": 0.1, "weight_decay": wd or 5e-4}
        for value in (0.8, 0.9):
            study.add_trial(optuna.create_trial(
                value=value, params=params, distributions=dists,
                user_attrs={"config": config, "metrics": {"val_loss": val_loss}}))
    found = pipeline.best_of(storage, "t", pipe, list(pipe.stages))
    assert found is not None and found[0].name == carried_from and found[1].number == 1
    assert best(storage, "t", pipe)["stage"] == carried_from
    second = stage_status(storage, "t", pipe)[1]
    assert (second.not_beaten is not None) is not_beaten
    assert ("did not beat a #1" in second.verdict) is not_beaten
