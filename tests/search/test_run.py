"""A whole staged search through the CLI, on SQLite and on PostgreSQL: `hpo run` with two
worker processes, then status, best, export and the trainer reproducing the exported model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.db import pipeline
from search.db.storage import open_storage
from tests.helpers import hpo, hpo_env, tiny_space
from trainer.config import TrainConfig, with_overrides


def test_run_completes_every_stage_and_carries_the_best(storage_url: str, tmp_path: Path) -> None:
    space = tiny_space(tmp_path / "tiny.toml", trials1=4, trials2=3)
    run = hpo("run", "--space", str(space), "--study", "t1", "--workers", "2", "--device", "cpu",
              "--artifacts", str(tmp_path / "artifacts"), url=storage_url, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]

    storage = open_storage(storage_url)
    pipe = pipeline.load(storage, "t1")
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert names == {"t1/optimizer", "t1/regularization"}

    first, second = (pipeline.load_stage_study(storage, "t1", s) for s in pipe.stages)
    for study, stage in ((first, pipe.stages[0]), (second, pipe.stages[1])):
        counts = pipeline.counts(study)
        # The budget is a set of slots shared by the workers: exactly that many finish.
        assert counts.finished == stage.trials
        assert counts.running == counts.waiting == 0
        numbers = sorted(t.number for t in study.get_trials())
        assert numbers == list(range(len(numbers)))

    # The second stage opens once every trial of the first has finished, from the best of them.
    source = first.trials[second.user_attrs["carried_from"]["trial"]]
    assert source.state == TrialState.COMPLETE
    opened = min(t.datetime_start for t in second.get_trials())
    earlier = first.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert all(t.datetime_complete <= opened for t in earlier)
    assert all(source.value >= t.value for t in earlier if t.state == TrialState.COMPLETE)
    assert second.get_trials()
    for trial in second.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        assert trial.user_attrs["carried"] == source.params
        assert trial.user_attrs["config"]["lr"] == source.params["lr"]
        assert trial.user_attrs["config"]["momentum"] == source.params["momentum"]

    # Every trial records what it ran and where.
    done = first.get_trials(states=(TrialState.COMPLETE,))
    for trial in done:
        attrs = trial.user_attrs
        assert set(attrs["config"]) >= {"lr", "model", "batch_size", "epochs"}
        assert attrs["device"] == "cpu" and attrs["worker"]
        assert attrs["images_per_sec"] > 0 and attrs["peak_memory_mb"] > 0
        assert Path(attrs["checkpoint"]).is_file()
        assert len(attrs["epochs"]) == 2
        assert trial.intermediate_values.keys() == {1, 2}

    best = hpo("best", "t1", "--json", url=storage_url, cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    info = json.loads(best.stdout)
    cfg = with_overrides(TrainConfig(), info["config"])  # the trainer accepts it as it is
    assert cfg.dataset == "digits" and cfg.width == 0.25
    overall = max((t for s in (first, second) for t in s.get_trials(states=(TrialState.COMPLETE,))),
                  key=lambda t: t.value)
    assert info["value"] == overall.value

    status = hpo("status", "t1", "--json", url=storage_url, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    table = json.loads(status.stdout)
    assert [s["stage"] for s in table["stages"]] == ["optimizer", "regularization"]
    assert len(table["workers"]) == 2
    assert all(w["state"] == "done" for w in table["workers"])
    assert sum(w["trials_done"] for w in table["workers"]) == sum(
        s["complete"] + s["pruned"] + s["failed"] for s in table["stages"])

    export = hpo("export", "t1", "--out", str(tmp_path / "best"), url=storage_url, cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    evaluated = subprocess.run(
        [sys.executable, "-m", "trainer", "--evaluate", str(tmp_path / "best"), "--json",
         "--device", "cpu"], capture_output=True, text=True, env=hpo_env(storage_url),
        cwd=tmp_path, timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    # The winner's test metrics, evaluated once by the worker, are those of the exported model.
    assert json.loads(evaluated.stdout.splitlines()[-1])["test_acc"] == info["test"]["test_acc"]
    assert "test_acc" not in info["metrics"]  # trials record validation metrics only


def test_create_is_idempotent_and_refuses_another_file(pg_url: str, tmp_path: Path) -> None:
    space = tiny_space(tmp_path / "a.toml")
    first = hpo("create", "--space", str(space), "--study", "s", url=pg_url, cwd=tmp_path)
    again = hpo("create", "--space", str(space), "--study", "s", url=pg_url, cwd=tmp_path)
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "exists, unchanged" in again.stdout

    other = tiny_space(tmp_path / "b.toml", trials1=9)
    refused = hpo("create", "--space", str(other), "--study", "s", url=pg_url, cwd=tmp_path)
    assert refused.returncode == 2
    assert "already exists" in refused.stderr and "Traceback" not in refused.stderr
    storage = open_storage(pg_url)
    assert pipeline.load(storage, "s").stages[0].trials == 4  # unchanged
