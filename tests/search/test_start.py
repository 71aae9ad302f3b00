"""A stage's `start` list: configurations it trains first (an earlier study's winner, a published
recipe), checked with the space file, queued once at `hpo create`, and trained by the workers
before anything the sampler proposes."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.db import pipeline
from search.db.storage import open_storage
from search.space.spec import Pipeline, SpaceError, parse_space
from tests.helpers import ROOT, hpo, hpo_env, run_stub_study, write_space

SPACE = """
dataset = "digits"
{top}
[[stage]]
name = "opt"
trials = 4
epochs = 2
{start}
sampler = {{ startup_trials = 2 }}
[stage.params]
lr = {{ low = 0.01, high = 0.5, log = true }}
batch_size = {{ choices = [32, 64] }}
[[stage]]
name = "reg"
trials = 2
epochs = 2
[stage.params]
label_smoothing = {{ low = 0.0, high = 0.2 }}
"""
START = "start = [{ lr = 0.3, batch_size = 64 }, { lr = 0.02 }]"


def _text(start: str = START, top: str = "") -> str:
    return SPACE.format(start=start, top=top)


def _parse(text: str) -> Pipeline:
    return parse_space(tomllib.loads(text), "s.toml")


def test_a_start_list_is_read_stored_and_part_of_the_definition() -> None:
    pipe = _parse(_text())
    assert pipe.stages[0].start == ({"lr": 0.3, "batch_size": 64}, {"lr": 0.02})
    assert pipe.stages[1].start == ()
    again = Pipeline.from_json(pipe.to_json())
    assert again.stages[0].start == pipe.stages[0].start
    assert again.digest() == pipe.digest()
    # Another start is another study; a file without one stores no key (older digests hold).
    without = _parse(_text(start=""))
    assert without.digest() != pipe.digest()
    assert all("start" not in stage for stage in json.loads(without.to_json())["stage"])


def test_a_later_pass_starts_from_its_warm_start_not_the_start_list() -> None:
    pipe = _parse(_text(top="cycles = 2"))
    assert [(s.name, len(s.start)) for s in pipe.stages] == [
        ("opt", 2), ("reg", 0), ("opt-2", 0), ("reg-2", 0)]


@pytest.mark.parametrize(("start", "message"), [
    ("start = { lr = 0.1 }", "stage 'opt': start: expected a list of tables like [{ lr = 0.1 }]"),
    ("start = [0.1]", "stage 'opt': start #1: expected a table of this stage's params"),
    ("start = [{}]", "stage 'opt': start #1: expected a table of this stage's params"),
    ("start = [{ lr = 0.1 }, { momentum = 0.9 }]",
     "stage 'opt': start #2: momentum is not searched in this stage (it searches batch_size,"
     " lr)"),
    ("start = [{ lr = 0.9 }]", "stage 'opt': start #1: lr: 0.9 is outside the stage's range"),
    ("start = [{ batch_size = 128 }]",
     "stage 'opt': start #1: batch_size: 128 is not one of [32, 64]"),
    ('start = [{ lr = "fast" }]', "stage 'opt': start #1: lr:"),
    ("start = [{ lr = 0.1 }, { lr = 0.1 }]",
     "stage 'opt': start #2: the same configuration as #1"),
    ("start = [{ lr = 0.1 }, { lr = 0.2 }, { lr = 0.3 }, { lr = 0.4 }, { lr = 0.45 }]",
     "stage 'opt': start: 5 configurations, more than the stage's 4 trials"),
])
def test_a_bad_start_list_is_refused_naming_what_is_wrong(start: str, message: str) -> None:
    with pytest.raises(SpaceError) as err:
        _parse(_text(start=start))
    assert message in str(err.value), str(err.value)


def test_hpo_create_refuses_a_bad_start_list_and_writes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    space = write_space(tmp_path / "s.toml", _text(start="start = [{ lr = 0.9 }]"))
    out = hpo("create", "--space", str(space), "--study", "s", url=url, cwd=tmp_path)
    assert out.returncode == 2
    assert "start #1: lr: 0.9 is outside the stage's range [0.01, 0.5]" in out.stderr, out.stderr
    assert not (tmp_path / "hpo.db").exists()


def _creates_at_once(space: Path, url: str, cwd: Path, n: int) -> None:
    """`hpo create` of study "s" from `n` processes started together on a new database, as a
    fleet's hosts or two people's scripts might: each must succeed (on PostgreSQL the schema is
    created under an advisory lock, `storage._schema_lock`)."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "search.cli", "create", "--space", str(space), "--study", "s"],
        cwd=cwd, env=hpo_env(url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err


def test_the_start_configurations_are_trained_first_once_each(
    storage_url: str, tmp_path: Path
) -> None:
    """Three creates at once and one after queue each start configuration once; the worker trains
    them as trials #0 and #1 (the second's batch size from the sampler), then samples the rest
    of the stage's 4 trials."""
    space = write_space(tmp_path / "s.toml", _text())
    _creates_at_once(space, storage_url, tmp_path, 3)
    run_stub_study(space, "s", url=storage_url, cwd=tmp_path)
    storage = open_storage(storage_url)
    pipe = pipeline.load(storage, "s")
    trials = pipeline.load_stage_study(storage, "s", pipe.stages[0]).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert [t.user_attrs.get("start") for t in trials] == [0, 1, None, None]
    assert trials[0].params == {"lr": 0.3, "batch_size": 64}
    assert trials[1].params["lr"] == 0.02 and trials[1].params["batch_size"] in (32, 64)
    reg = pipeline.load_stage_study(storage, "s", pipe.stages[1]).get_trials()
    assert len(reg) == 2 and all("start" not in t.user_attrs for t in reg)
    text = hpo("status", "s", url=storage_url, cwd=tmp_path).stdout
    assert "from the start list 2" in text, text
    info = json.loads(hpo("status", "s", "--json", url=storage_url, cwd=tmp_path).stdout)
    assert [(s["complete"], s["started"]) for s in info["stages"]] == [(4, 2), (2, 0)], info


def test_the_shipped_cifar_file_queues_the_published_recipe_first(tmp_path: Path) -> None:
    """The shipped CIFAR-10 file starts its optimizer stage from the published recipe; creating
    a study from it queues that configuration first (nothing trains: no worker runs)."""
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    space = ROOT / "spaces" / "cifar10-resnet.toml"
    out = hpo("create", "--space", str(space), "--study", "c10", "--no-data-check", url=url,
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    storage = open_storage(url)
    pipe = pipeline.load(storage, "c10")
    waiting = pipeline.load_stage_study(storage, "c10", pipe.stages[0]).get_trials()
    assert [t.state for t in waiting] == [TrialState.WAITING]
    assert waiting[0].system_attrs["fixed_params"] == {
        "lr": 0.1, "batch_size": 128, "momentum": 0.9, "warmup_epochs": 0.0}
