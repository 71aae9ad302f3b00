"""Stage budgets as slots (`search.db.budget`): the rules themselves, exactly the budget with many
workers on both databases, and a stage that does not beat the configuration it started from
saying so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.db import budget, pipeline
from search.db.storage import open_storage
from tests.helpers import hpo, start_stub_worker, write_space

TWO_STAGES = """
    dataset = "digits"
    [[stage]]
    name = "optimizer"
    trials = {trials1}
    epochs = 2
    pruner = {{ startup_trials = 100 }}
    [stage.params]
    lr = {{ low = 0.001, high = 1.0, log = true }}
    [[stage]]
    name = "regularization"
    trials = {trials2}
    epochs = 2
    pruner = {{ startup_trials = 100 }}
    [stage.params]
    weight_decay = {{ low = 0.00001, high = 0.01, log = true }}
"""


@pytest.mark.parametrize(("counts", "limit", "closed", "free", "retry"), [
    (budget.Counts(complete=3, pruned=1), budget.Limit(4), True, 0, False),
    (budget.Counts(complete=2, running=2), budget.Limit(4), False, 0, True),  # all held: wait
    (budget.Counts(complete=1, failed=5, running=1, waiting=1), budget.Limit(4), False, 1, True),
    (budget.Counts(complete=5), budget.Limit(4), True, 0, False),  # overshot before slots
    (budget.Counts(complete=9), budget.Limit(None), False, 1, True),  # a study without a budget
    # A finite space of 3 configurations in a budget of 8: held ones block new trials, and the
    # stage closes once all 3 are trained, with budget left.
    (budget.Counts(complete=2, running=1, configurations=3), budget.Limit(8, 3), False, 0, True),
    (budget.Counts(complete=3, failed=1, configurations=3), budget.Limit(8, 3), True, 0, False),
    (budget.Counts(complete=1, configurations=1), budget.Limit(8, 3), False, 2, True),
])
def test_the_rules(
    counts: budget.Counts, limit: budget.Limit, closed: bool, free: int, retry: bool
) -> None:
    assert budget.closed(counts, limit) is closed
    assert budget.free_slots(counts, limit) == free
    assert budget.may_retry(counts, limit) is retry


@pytest.mark.parametrize("workers", [5])
def test_many_workers_spend_exactly_the_budget(
    storage_url: str, tmp_path: Path, workers: int
) -> None:
    """Workers that all ask at once (each trial is two stub epochs) never create a trial beyond
    a stage's budget, on SQLite (one write lock) as on PostgreSQL (the study's row lock)."""
    space = write_space(tmp_path / "b.toml", TWO_STAGES.format(trials1=7, trials2=5))
    assert hpo("create", "--space", str(space), "--study", "b", url=storage_url,
               cwd=tmp_path).returncode == 0
    procs = [start_stub_worker("b", url=storage_url, cwd=tmp_path, log=tmp_path / f"w{i}.log")
             for i in range(workers)]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0] * workers, [(tmp_path / f"w{i}.log").read_text()[-2000:]
                                    for i, c in enumerate(codes) if c]
    storage = open_storage(storage_url)
    for stage, want in zip(pipeline.load(storage, "b").stages, (7, 5), strict=True):
        trials = pipeline.load_stage_study(storage, "b", stage).get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * want, stage.name


def test_a_stage_that_does_not_beat_the_carried_configuration_says_so(
    pg_url: str, tmp_path: Path
) -> None:
    """The stub trainer's accuracy depends on the learning rate alone, so the regularization
    stage, which starts from the best learning rate and searches weight decay, can only tie it:
    it carries nothing new, and `hpo status` and the report say so."""
    space = write_space(tmp_path / "v.toml", TWO_STAGES.format(trials1=3, trials2=2))
    assert hpo("create", "--space", str(space), "--study", "v", url=pg_url,
               cwd=tmp_path).returncode == 0
    worker = start_stub_worker("v", url=pg_url, cwd=tmp_path, log=tmp_path / "w.log")
    assert worker.wait(timeout=600) == 0, (tmp_path / "w.log").read_text()[-2000:]

    info = json.loads(hpo("status", "v", "--json", url=pg_url, cwd=tmp_path).stdout)
    first, second = info["stages"]
    assert first["not_beaten"] is None
    assert second["not_beaten"] == {"stage": "optimizer", "trial": first["best_trial"],
                                    "value": first["best_value"]}
    assert second["best_value"] == first["best_value"]  # the tie, exactly
    text = hpo("status", "v", url=pg_url, cwd=tmp_path).stdout
    line = (f"regularization did not beat optimizer #{first['best_trial']}"
            f" ({first['best_value']:.4f}): carries nothing new")
    assert line in text, text
    assert hpo("report", "v", "--out", str(tmp_path / "r.html"), url=pg_url,
               cwd=tmp_path).returncode == 0
    assert "did not beat optimizer" in (tmp_path / "r.html").read_text()
    best = json.loads(hpo("best", "v", "--json", url=pg_url, cwd=tmp_path).stdout)
    assert best["stage"] == "optimizer"  # the winner stays the earlier trial


def test_a_configuration_that_kills_its_worker_twice_is_failed_for_good(
    pg_url: str, tmp_path: Path
) -> None:
    """The first configuration SIGKILLs every worker that trains it. Its first death is retried
    (the slot passes to the retry); the retry's death is not, and the slot is free again: a
    healthy worker fills the stage with exactly its budget instead of stalling on it."""
    space = write_space(tmp_path / "p.toml", TWO_STAGES.format(trials1=3, trials2=1))
    assert hpo("create", "--space", str(space), "--study", "p", url=pg_url,
               cwd=tmp_path).returncode == 0
    storage = open_storage(pg_url)
    study = pipeline.load_stage_study(storage, "p", pipeline.load(storage, "p").stages[0])
    # The first worker dies on it; the second trains other trials until only the dead trial's
    # slot is left, takes its retry when the reaper queues it, and dies on that.
    for attempt in range(2):
        doomed = start_stub_worker("p", url=pg_url, cwd=tmp_path,
                                   log=tmp_path / f"doomed{attempt}.log", STUB_KILL_ROOT="0")
        assert doomed.wait(timeout=600) == -9, (tmp_path / f"doomed{attempt}.log").read_text()
    healthy = start_stub_worker("p", url=pg_url, cwd=tmp_path, log=tmp_path / "healthy.log")
    assert healthy.wait(timeout=600) == 0, (tmp_path / "healthy.log").read_text()[-2000:]

    trials = study.get_trials()
    poisoned = [t for t in trials if t.number == 0 or t.user_attrs.get("root") == 0]
    assert [t.state for t in poisoned] == [TrialState.FAIL] * 2  # the first attempt, one retry
    assert poisoned[1].user_attrs["retry_of"] == 0 and poisoned[1].params == poisoned[0].params
    assert not any(t.user_attrs.get("retry_of") == poisoned[1].number for t in trials)
    assert sorted(t.state.name for t in trials if t not in poisoned) == ["COMPLETE"] * 3
    assert "killed its worker again; failed for good" in (tmp_path / "healthy.log").read_text()
