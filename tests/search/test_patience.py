"""Patience (`patience = N` on a stage): the rules, the close done once in the database (by two
callers at once, or a retry after a lost reply, too), and stub workers that close a stage after
exactly 1 + N finished trials and pass the rest of its budget on, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.db import budget, pipeline
from search.db.storage import open_storage
from search.db.writes import pass_budget_on
from search.results.best import StageStatus
from search.space.spec import parse_space
from tests.helpers import hpo, start_stub_worker, write_space
from tests.search.tcp_proxy import FlakyProxy

Counts, Limit = budget.Counts, budget.Limit


@pytest.mark.parametrize(("counts", "limit", "free", "out"), [
    # No complete trial yet: patience does not count, however many were pruned.
    (Counts(pruned=4, running=2), Limit(10, patience=2), 4, False),
    # One trial without improvement and one in flight make a patience of 2: wait for that one.
    (Counts(complete=2, running=1, streak=1), Limit(10, patience=2), 0, False),
    (Counts(complete=2, streak=1), Limit(10, patience=2), 1, False),
    (Counts(complete=1, pruned=2, streak=2), Limit(10, patience=2), 0, True),
    # Out of patience, but a retry waits: it may improve the best.
    (Counts(complete=1, pruned=2, waiting=1, streak=2), Limit(10, patience=2), 0, False),
    (Counts(complete=10, streak=9), Limit(10, patience=2), 0, False),  # closed already
    (Counts(complete=3, streak=2), Limit(10), 7, False),  # no patience
])
def test_the_rules(counts: budget.Counts, limit: budget.Limit, free: int, out: bool) -> None:
    assert budget.free_slots(counts, limit) == free
    assert budget.out_of_patience(counts, limit) is out


SPACE = {
    "dataset": "digits",
    "stage": [{"name": "a", "trials": 10, "epochs": 1, "patience": 2,
               "params": {"lr": {"low": 0.001, "high": 1.0}}},
              {"name": "b", "trials": 4, "epochs": 1,
               "params": {"weight_decay": {"low": 1e-5, "high": 1e-3}}}],
}


def _stage_a(url: str, direction: str, outcomes: list[float | None]) -> optuna.Study:
    """Stage a of SPACE, with finished trials in this order: a value, or None for pruned."""
    pipe = parse_space({**SPACE, "metric": "val_loss" if direction == "minimize" else "val_acc"},
                       "p.toml")
    storage = open_storage(url, create_schema=True)
    pipeline.create(storage, "p", pipe, "p.toml")
    study = pipeline.load_stage_study(storage, "p", pipe.stages[0])
    for i, value in enumerate(outcomes):
        study.add_trial(optuna.create_trial(
            state=TrialState.PRUNED if value is None else TrialState.COMPLETE, value=value,
            params={"lr": 0.1 + i / 100}, distributions={"lr": FloatDistribution(0.001, 1.0)},
            intermediate_values={1: 0.5}))
    return study


@pytest.mark.parametrize(("direction", "outcomes", "streak"), [
    ("maximize", [], None),
    ("maximize", [None, None], None),
    ("maximize", [None, 0.5], 0),
    ("maximize", [0.5, 0.9, 0.9, None, 0.7], 3),  # a tie is no improvement
    ("maximize", [0.5, 0.4, 0.6], 0),
    ("minimize", [0.5, 0.9, 0.4, 0.4], 1),
])
def test_the_streak_counts_finished_trials_since_the_best_last_improved(
    tmp_path: Path, direction: str, outcomes: list[float | None], streak: int | None
) -> None:
    study = _stage_a(f"sqlite:///{tmp_path / 'hpo.db'}", direction, outcomes)
    assert pipeline.counts(study).streak == streak


def _budgets(url: str) -> tuple[int, int]:
    storage = open_storage(url)
    pipe = pipeline.load(storage, "p")
    a, b = (pipeline.load_stage_study(storage, "p", s).user_attrs[budget.BUDGET]
            for s in pipe.stages)
    return a, b


RECORD = {"patience": 2, "finished": 4, "passed": 6, "to": "b"}


def test_the_budget_passes_on_once(storage_url: str) -> None:
    study = _stage_a(storage_url, "maximize", [0.5, 0.9, 0.9, None])
    assert _budgets(storage_url) == (10, 4)
    assert pass_budget_on(study, "p/b") == RECORD
    assert pass_budget_on(study, "p/b") is None  # closed now: a second caller moves nothing
    assert _budgets(storage_url) == (4, 10)
    assert study.user_attrs[budget.CLOSED_EARLY] == RECORD
    assert pipeline.stage_state(study)[0].finished == 4
    # `hpo create` run again with the same definition leaves the moved budgets alone.
    storage = open_storage(storage_url)
    assert not pipeline.create(storage, "p", pipeline.load(storage, "p"), "p.toml")
    assert _budgets(storage_url) == (4, 10)


def test_a_stage_that_improved_lately_stays_open(storage_url: str) -> None:
    study = _stage_a(storage_url, "maximize", [0.5, None, 0.9, 0.9])
    assert pass_budget_on(study, "p/b") is None
    assert _budgets(storage_url) == (10, 4)
    assert budget.CLOSED_EARLY not in study.user_attrs


def test_two_callers_at_once_move_the_budget_once(pg_url: str) -> None:
    _stage_a(pg_url, "maximize", [0.5, 0.9, 0.9, None])
    studies = [optuna.load_study(study_name="p/a", storage=open_storage(pg_url))
               for _ in range(2)]
    start = threading.Barrier(2)
    results: list[dict | None] = [None, None]

    def close(i: int) -> None:
        start.wait()
        results[i] = pass_budget_on(studies[i], "p/b")

    threads = [threading.Thread(target=close, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=lambda r: r is None) == [RECORD, None]
    assert _budgets(pg_url) == (4, 10)


def test_a_retry_after_a_lost_reply_moves_nothing_again(pg_url: str) -> None:
    _stage_a(pg_url, "maximize", [0.5, 0.9, 0.9, None])
    db = make_url(pg_url)
    proxy = FlakyProxy(db.port or 5432)
    try:
        via_proxy = db.set(port=proxy.port).render_as_string(hide_password=False)
        study = optuna.load_study(study_name="p/a", storage=open_storage(via_proxy))
        proxy.lose_commit_reply(b"INSERT INTO study_user_attributes")
        assert pass_budget_on(study, "p/b") is None  # the retry finds the stage closed
        assert proxy.lost.is_set(), "the fault was not injected"
    finally:
        proxy.close()
    assert _budgets(pg_url) == (4, 10)
    direct = optuna.load_study(study_name="p/a", storage=open_storage(pg_url))
    assert direct.user_attrs[budget.CLOSED_EARLY] == RECORD


THREE_STAGES = """
    dataset = "digits"
    [[stage]]
    name = "optimizer"
    trials = 3
    epochs = 2
    pruner = {{ type = "none" }}
    [stage.params]
    lr = {{ low = 0.001, high = 1.0, log = true }}
    [[stage]]
    name = "regularization"
    trials = 10
    epochs = 2
    patience = {patience}
    pruner = {{ type = "none" }}
    [stage.params]
    weight_decay = {{ low = 0.00001, high = 0.01, log = true }}
    [[stage]]
    name = "final"
    trials = 2
    epochs = 2
    pruner = {{ type = "none" }}
    [stage.params]
    momentum = {{ low = 0.8, high = 0.95 }}
"""


def test_workers_close_a_stage_that_stops_improving(storage_url: str, tmp_path: Path) -> None:
    """The stub's accuracy depends on lr alone, so the regularization stage (lr carried, weight
    decay searched) improves on its first finished trial and never again: with patience 2 it
    closes after exactly 3 of its 10 trials, on two workers, and the final stage trains the
    other 7 besides its own 2."""
    space = write_space(tmp_path / "p.toml", THREE_STAGES.format(patience=2))
    assert hpo("create", "--space", str(space), "--study", "p", url=storage_url,
               cwd=tmp_path).returncode == 0
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    # Epochs that take a moment, so the two workers' trials overlap (without a wait, one worker
    # can finish a stage before the other asks).
    procs = [start_stub_worker("p", url=storage_url, cwd=tmp_path, log=log,
                               STUB_EPOCH_SECONDS="0.2") for log in logs]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]

    storage = open_storage(storage_url)
    pipe = pipeline.load(storage, "p")
    for stage, want in zip(pipe.stages, (3, 3, 9), strict=True):
        study = pipeline.load_stage_study(storage, "p", stage)
        assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * want, stage.name
        assert study.user_attrs[budget.BUDGET] == want, stage.name
    regularization = pipeline.load_stage_study(storage, "p", pipe.stage("regularization"))
    assert regularization.user_attrs[budget.CLOSED_EARLY] == {
        "patience": 2, "finished": 3, "passed": 7, "to": "final"}
    closed = [line for log in logs for line in log.read_text().splitlines()
              if "closed early with" in line]
    assert len(closed) == 1, closed  # one worker closed it; the other found it closed

    info = json.loads(hpo("status", "p", "--json", url=storage_url, cwd=tmp_path).stdout)
    assert [s["budget"] for s in info["stages"]] == [3, 3, 9]
    assert info["stages"][1]["closed_early"]["passed"] == 7
    text = hpo("status", "p", url=storage_url, cwd=tmp_path).stdout
    line = ("regularization closed early: no better trial in its last 2; passed 7 trials on to"
            " final")
    assert line in text, text
    # The same file again: "exists, unchanged", and the moved budgets stay as they are.
    again = hpo("create", "--space", str(space), "--study", "p", url=storage_url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [pipeline.load_stage_study(storage, "p", s).user_attrs[budget.BUDGET]
            for s in pipe.stages] == [3, 3, 9]


@pytest.mark.parametrize(("record", "said"), [
    ({"patience": 3, "finished": 4, "passed": 6, "to": "final"},
     "closed early: no better trial in its last 3; passed 6 trials on to final"),
    ({"patience": 2, "finished": 3, "passed": 5, "to": None},
     "closed early: no better trial in its last 2; left 5 trials of its budget unspent"),
])
def test_the_verdict_says_how_patience_closed_a_stage(record: dict, said: str) -> None:
    status = StageStatus(
        name="s", budget=record["finished"], counts=Counts(complete=record["finished"]),
        closed=True, exhausted=False, best_value=0.5, best_trial=0, carried={}, seconds=1.0,
        closed_early=record)
    assert status.verdict == said
