"""The confirmation stage: the best distinct configurations trained again with new seeds, the
winner chosen by its mean, and the test split looked at once, for the winner alone."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.db import pipeline
from search.db.attrs import CANDIDATE
from search.db.storage import open_storage
from search.space.spec import SpaceError, parse_space
from tests.helpers import hpo, start_stub_worker, write_space

SPACE = """
    dataset = "digits"
    confirm = {{ top = {top}, seeds = 3 }}
    [[stage]]
    name = "optimizer"
    trials = 6
    epochs = 2
    pruner = {{ type = "none" }}
    [stage.params]
    lr = {{ low = 0.001, high = 1.0, log = true }}
"""


def test_confirm_is_checked_like_every_key() -> None:
    base = {"dataset": "digits",
            "stage": [{"name": "a", "trials": 2, "epochs": 3, "params": {}}]}
    pipe = parse_space({**base, "confirm": {"top": 2, "seeds": 4}}, "f.toml")
    last = pipe.stages[-1]
    assert (last.name, last.trials, last.epochs, last.pruner.type) == ("confirm", 8, 3, "none")
    again = type(pipe).from_json(pipe.to_json())
    assert again == pipe and again.digest() == pipe.digest()
    assert "confirm" not in json.loads(parse_space(base, "f.toml").to_json())
    for bad, words in [({"top": 0}, "confirm.top: must be at least 1"),
                       ({"seeds": "3"}, "confirm.seeds: expected an integer"),
                       ({"runs": 3}, "confirm.runs"), (3, "confirm: expected a table")]:
        with pytest.raises(SpaceError, match=words):
            parse_space({**base, "confirm": bad}, "f.toml")


@pytest.mark.parametrize("top", [2])
def test_the_winner_is_the_best_mean_over_seeds_and_is_tested_once(
    storage_url: str, tmp_path: Path, top: int
) -> None:
    space = write_space(tmp_path / "c.toml", SPACE.format(top=top))
    assert hpo("create", "--space", str(space), "--study", "c", url=storage_url,
               cwd=tmp_path).returncode == 0
    procs = [start_stub_worker("c", url=storage_url, cwd=tmp_path, log=tmp_path / f"w{i}.log")
             for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"w{i}.log").read_text()[-3000:] for i in range(2)]

    storage = open_storage(storage_url)
    pipe = pipeline.load(storage, "c")
    first, confirm = (pipeline.load_stage_study(storage, "c", s) for s in pipe.stages)
    ranked = sorted(first.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    runs = confirm.get_trials()
    # Exactly top x seeds re-runs, each once, of the two best configurations, seeds 1..3.
    assert [t.state for t in runs] == [TrialState.COMPLETE] * (top * 3)
    queued = sorted((t.user_attrs[CANDIDATE]["trial"], t.user_attrs[CANDIDATE]["seed"])
                    for t in runs)
    assert queued == sorted((t.number, s) for t in ranked[:top] for s in (1, 2, 3))
    for t in runs:
        assert t.user_attrs["config"]["lr"] == first.trials[
            t.user_attrs[CANDIDATE]["trial"]].params["lr"]
        assert t.user_attrs["config"]["seed"] == t.user_attrs[CANDIDATE]["seed"]
    # Trials record validation metrics only.
    for t in first.get_trials() + runs:
        assert not [k for k in t.user_attrs.get("metrics", {}) if k.startswith("test")], t.number

    best = json.loads(hpo("best", "c", "--json", url=storage_url, cwd=tmp_path).stdout)
    by_rank: dict[int, list[float]] = {}
    for t in runs:
        by_rank.setdefault(t.user_attrs[CANDIDATE]["rank"], []).append(t.value)
    mean = {r: statistics.fmean(v) for r, v in by_rank.items()}
    top_rank = max(mean, key=lambda r: (mean[r], -r))
    confirmed = best["confirmed"]
    assert confirmed["rank"] == top_rank
    assert confirmed["mean"] == pytest.approx(mean[top_rank])
    assert confirmed["std"] == pytest.approx(statistics.stdev(by_rank[top_rank]))
    assert confirmed["seeds"] == 3 and len(confirmed["runners_up"]) == top - 1
    winner = confirm.trials[best["trial"]]
    assert best["stage"] == "confirm" and winner.value == max(by_rank[top_rank])
    # The test split, evaluated once for the winner by the worker that found the pipeline done
    # (the stub's test accuracy is the one its checkpoint holds) and stored.
    saved = json.loads(Path(winner.user_attrs["checkpoint"]).read_text())
    assert best["test"]["test_acc"] == pytest.approx(saved["test_acc"])
    logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert "the winner's test metrics" in logs
    text = hpo("best", "c", url=storage_url, cwd=tmp_path).stdout
    assert f"{confirmed['mean']:.4f} ± {confirmed['std']:.4f}" in text, text


def test_confirm_comes_after_the_later_passes_and_the_joint_stage() -> None:
    stage = {"name": "lr", "trials": 2, "epochs": 3,
             "params": {"lr": {"low": 0.01, "high": 1.0, "log": True}}}
    pipe = parse_space({"dataset": "digits", "stage": [stage], "cycles": 2,
                        "joint": {"trials": 2, "epochs": 5}, "confirm": {"top": 1}}, "f.toml")
    assert [s.name for s in pipe.stages] == ["lr", "lr-2", "joint", "confirm"]
    assert pipe.stages[-1].epochs == 5 and pipe.stages[-1].trials == 3  # the joint stage's epochs
    again = type(pipe).from_json(pipe.to_json())
    assert again == pipe and again.digest() == pipe.digest()
    with pytest.raises(SpaceError, match="the name is the confirmation stage's"):
        parse_space({"dataset": "digits", "stage": [{**stage, "name": "confirm"}],
                     "confirm": {}}, "f.toml")
