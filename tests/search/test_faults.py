"""Workers under real faults: a worker SIGKILLed mid-trial, SIGTERM, injected OOM and NaN, and bad
space files that must leave the database untouched."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.db import pipeline
from search.db.storage import open_storage
from search.runtime.stages import ERROR_LIMIT
from tests.helpers import hpo, start_worker, table_names, wait_for, write_space

ONE_STAGE = """
    dataset = "digits"
    [fixed]
    model = "resnet20"
    width = {width}
    crop_pad = 1
    batch_size = 32
    [[stage]]
    name = "only"
    trials = {trials}
    epochs = {epochs}
    pruner = {{ startup_trials = 10, warmup_epochs = 10 }}
    [stage.params]
    lr = {{ low = 0.02, high = 0.2, log = true }}
"""


def _one_stage(
    tmp: Path, *, trials: int, epochs: int, width: float = 0.25, fixed: str = ""
) -> Path:
    text = ONE_STAGE.format(trials=trials, epochs=epochs, width=width)
    return write_space(tmp / "one.toml", text.replace("[fixed]", f"[fixed]\n    {fixed}"))


def _study(url: str, name: str) -> optuna.Study:
    storage = open_storage(url)
    return pipeline.load_stage_study(storage, name, pipeline.load(storage, name).stages[0])



def _running_on(study: optuna.Study, pid: int, epochs: int) -> optuna.trial.FrozenTrial | None:
    """The trial worker `pid` runs, once it has reported `epochs` epochs."""
    for t in study.get_trials(states=(TrialState.RUNNING,)):
        on_it = f":{pid}#" in str(t.user_attrs.get("worker", ""))
        if on_it and len(t.intermediate_values) >= epochs:
            return t
    return None


def test_sigkilled_worker_trial_is_retried_from_its_checkpoint(pg_url: str, tmp_path: Path) -> None:
    """Two workers on a stage of budget 4; one is SIGKILLed mid-trial. However fast the other
    trains, the dead trial keeps its budget slot until the reaper fails it, and its retry takes
    that slot: the stage ends with exactly 4 finished trials, one of them the retry, resumed from
    the killed attempt's checkpoint."""
    # Every epoch on disk: by default a crash loses up to 30 s of training, all of these trials.
    space = _one_stage(tmp_path, trials=4, epochs=6, width=0.5, fixed="checkpoint_seconds = 0")
    assert hpo("create", "--space", str(space), "--study", "k", url=pg_url,
               cwd=tmp_path).returncode == 0
    study = _study(pg_url, "k")
    victim = start_worker("k", url=pg_url, cwd=tmp_path, log=tmp_path / "victim.log")
    # The other worker starts once the victim holds a trial, so the victim has one to die in
    # however the two start-ups race.
    wait_for(lambda: _running_on(study, victim.pid, 0) is not None, "the victim to take a trial")
    other = start_worker("k", url=pg_url, cwd=tmp_path, log=tmp_path / "other.log")
    wait_for(lambda: _running_on(study, victim.pid, 2) is not None,
              "the victim to report two epochs")
    number = _running_on(study, victim.pid, 2).number  # type: ignore[union-attr]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    # What the killed attempt had reported when it died (read after the kill: it may have
    # reported another epoch between the look above and the signal).
    killed = study.get_trials()[number]
    assert killed.state == TrialState.RUNNING
    reported = max(killed.intermediate_values)

    assert other.wait(timeout=600) == 0, (tmp_path / "other.log").read_text()[-3000:]

    trials = study.get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    counts = pipeline.counts(study)
    assert (counts.finished, counts.running, counts.waiting) == (4, 0, 0), counts
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1, "retried exactly once"
    retry = retries[0]
    assert retry.params == killed.params
    assert retry.state == TrialState.COMPLETE
    # It resumed: its first report is the epoch after the last checkpoint of the killed attempt
    # (the checkpoint is written just before each report, so it may be one epoch ahead).
    assert min(retry.intermediate_values) in (reported + 1, reported + 2)
    assert max(retry.intermediate_values) == 6
    # The slot passed from the dead trial to its retry: no trial was created after the victim
    # died except the retry, so the trials are the 4 slots plus the one failed attempt.
    assert len(trials) == 5


@pytest.mark.parametrize("stopped", [None, 143])
def test_sigterm_hands_the_trial_back(
    pg_url: str, tmp_path: Path, stopped: int | None
) -> None:
    # With HPO_STOPPED_EXIT_CODE (the Kubernetes Job's 143) a stop before the end says so in its
    # exit status; a worker that finishes the search exits 0 all the same.
    env = {} if stopped is None else {"HPO_STOPPED_EXIT_CODE": str(stopped)}
    space = _one_stage(tmp_path, trials=1, epochs=6, width=0.5)
    assert hpo("create", "--space", str(space), "--study", "t", url=pg_url,
               cwd=tmp_path).returncode == 0
    study = _study(pg_url, "t")
    first = start_worker("t", url=pg_url, cwd=tmp_path, log=tmp_path / "first.log", **env)
    wait_for(lambda: any(len(t.intermediate_values) >= 1
                          for t in study.get_trials(states=(TrialState.RUNNING,))),
              "an epoch to be reported")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == (stopped or 0), (tmp_path / "first.log").read_text()[-3000:]
    handed = study.get_trials()[0]
    assert handed.state == TrialState.FAIL
    assert handed.user_attrs["fail_reason"] == "interrupted"
    assert [t.state for t in study.get_trials()[1:]] == [TrialState.WAITING]

    second = start_worker("t", url=pg_url, cwd=tmp_path, log=tmp_path / "second.log", **env)
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    retry = study.get_trials()[1]
    assert retry.state == TrialState.COMPLETE and retry.params == handed.params
    assert min(retry.intermediate_values) > 1  # resumed, not restarted


@pytest.mark.parametrize(("fault", "reason"), [("oom>0", "oom"), ("nan@2", "diverged")])
def test_oom_and_divergence_prune_and_the_worker_goes_on(
    pg_url: str, tmp_path: Path, fault: str, reason: str
) -> None:
    space = _one_stage(tmp_path, trials=3, epochs=2)
    assert hpo("create", "--space", str(space), "--study", "f", url=pg_url,
               cwd=tmp_path).returncode == 0
    worker = start_worker("f", url=pg_url, cwd=tmp_path, log=tmp_path / "w.log",
                          HPO_FAULT=fault)
    assert worker.wait(timeout=600) == 0, (tmp_path / "w.log").read_text()[-3000:]
    trials = _study(pg_url, "f").get_trials()
    assert len(trials) == 3
    assert all(t.state == TrialState.PRUNED for t in trials)
    assert all(t.user_attrs["fail_reason"] == reason for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 1  # the same worker ran them all


BAD_SPACES = {
    "broken TOML": ("dataset = \n", "line 1"),
    "unknown field": (
        'dataset = "digits"\n[[stage]]\nname = "a"\ntrials = 2\nepochs = 1\n'
        "[stage.params]\nlearning_rate = { low = 0.1, high = 0.2 }\n",
        "learning_rate",
    ),
    "low above high": (
        'dataset = "digits"\n[[stage]]\nname = "a"\ntrials = 2\nepochs = 1\n'
        "[stage.params]\nlr = { low = 0.5, high = 0.1 }\n",
        "lr",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_space_file_changes_nothing(pg_url: str, tmp_path: Path, case: str) -> None:
    text, named = BAD_SPACES[case]
    space = tmp_path / "bad.toml"
    space.write_text(text)
    result = hpo("create", "--space", str(space), "--study", "b", url=pg_url, cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.toml" in result.stderr and named in result.stderr
    assert "Traceback" not in result.stderr
    assert table_names(pg_url) == []  # not even Optuna's tables were created
    assert os.listdir(tmp_path) == ["bad.toml"]  # and nothing on disk


def test_twenty_oom_trials_do_not_grow_the_worker(pg_url: str, tmp_path: Path) -> None:
    space = _one_stage(tmp_path, trials=21, epochs=1)
    assert hpo("create", "--space", str(space), "--study", "m", url=pg_url,
               cwd=tmp_path).returncode == 0
    worker = start_worker("m", url=pg_url, cwd=tmp_path, log=tmp_path / "w.log",
                          HPO_FAULT="oom>0")
    assert worker.wait(timeout=600) == 0, (tmp_path / "w.log").read_text()[-3000:]
    trials = _study(pg_url, "m").get_trials()
    assert [t.user_attrs["fail_reason"] for t in trials] == ["oom"] * 21
    rss = [t.user_attrs["worker_rss_mb"] for t in trials]
    # The first trial loads the data and warms the allocator; growth is measured after it.
    growth = rss[20] / rss[0] - 1
    print(f"\nworker RSS after trial 1: {rss[0]:.1f} MiB, after trial 21: {rss[20]:.1f} MiB"
          f" ({growth:+.1%})")
    assert growth <= 0.05


def test_worker_whose_trials_keep_failing_exits_nonzero(pg_url: str, tmp_path: Path) -> None:
    """Every trial raises (a corrupt pretrained-weights file): after ERROR_LIMIT in a row the
    worker stops, marked failed with its reason, with exit code 1 rather than the 0 of a
    finished search."""
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"not a state dict")
    space = _one_stage(tmp_path, trials=6, epochs=1, fixed=f'pretrained = "{weights}"')
    assert hpo("create", "--space", str(space), "--study", "g", url=pg_url,
               cwd=tmp_path).returncode == 0
    worker = start_worker("g", url=pg_url, cwd=tmp_path, log=tmp_path / "w.log")
    assert worker.wait(timeout=300) == 1, (tmp_path / "w.log").read_text()[-3000:]
    trials = _study(pg_url, "g").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * ERROR_LIMIT
    assert all(t.user_attrs["fail_reason"] == "error" and "weights.pt" in t.user_attrs["error"]
               for t in trials)
    status = json.loads(hpo("status", "g", "--json", url=pg_url, cwd=tmp_path).stdout)
    (row,) = status["workers"]
    assert (row["state"], row["trials_done"]) == ("failed", ERROR_LIMIT)
    assert row["current"].startswith(f"{ERROR_LIMIT} trials in a row raised errors")


def _image_folder(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * c + i, 200 - 60 * c, 90)).save(
                root / f"class{c}" / f"{i}.png")
    return root


def test_worker_that_cannot_read_the_data_hands_back_and_stops(
    pg_url: str, tmp_path: Path
) -> None:
    """The data was there at `hpo create` but not on this worker's machine (an unmounted share):
    the worker hands its trial back instead of failing it, exits 3 (which the compose file does
    not restart forever), and says why in `hpo status`. A worker that can read the data then
    resumes the queued trial, and the stage ends with exactly its budget."""
    images = _image_folder(tmp_path / "images")
    space = write_space(tmp_path / "folder.toml", ONE_STAGE.format(trials=2, epochs=1, width=0.25)
                        .replace('"digits"', f'"imagefolder:{images}"')
                        .replace("[fixed]", "[fixed]\n    image_size = 16"))
    assert hpo("create", "--space", str(space), "--study", "d", url=pg_url,
               cwd=tmp_path).returncode == 0
    images.rename(tmp_path / "unmounted")
    worker = start_worker("d", url=pg_url, cwd=tmp_path, log=tmp_path / "w.log")
    assert worker.wait(timeout=300) == 3, (tmp_path / "w.log").read_text()[-3000:]
    study = _study(pg_url, "d")
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"] == "no data"
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].user_attrs["crashes"] == 0
    status = json.loads(hpo("status", "d", "--json", url=pg_url, cwd=tmp_path).stdout)
    (row,) = status["workers"]
    assert row["state"] == "failed"
    assert row["current"].startswith("cannot read the data:") and "not a folder" in row["current"]

    (tmp_path / "unmounted").rename(images)
    worker = start_worker("d", url=pg_url, cwd=tmp_path, log=tmp_path / "w2.log")
    assert worker.wait(timeout=300) == 0, (tmp_path / "w2.log").read_text()[-3000:]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    assert trials[1].params == trials[0].params


DATA_PROBLEMS = {
    "missing folder": ('"imagefolder:{tmp}/nowhere"', "", "is not a folder"),
    "one class": ('"imagefolder:{tmp}/one"', "", "at least two"),
    "cifar absent": ('"cifar10"', 'data_root = "{tmp}/cifar"', "download = true"),
    "crop larger than images": ('"digits"', "crop_pad = 8", "crop_pad"),
}


@pytest.mark.parametrize("case", sorted(DATA_PROBLEMS))
def test_create_refuses_data_it_cannot_read(pg_url: str, tmp_path: Path, case: str) -> None:
    dataset, fixed, named = (x.format(tmp=tmp_path) for x in DATA_PROBLEMS[case])
    _image_folder(tmp_path / "one", classes=1, per_class=2)
    text = ONE_STAGE.format(trials=2, epochs=1, width=0.25).replace('"digits"', dataset)
    text = text.replace("crop_pad = 1", fixed) if fixed.startswith("crop_pad") else \
        text.replace("[fixed]", f"[fixed]\n    {fixed}")
    space = write_space(tmp_path / "data.toml", text)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = hpo("create", "--space", str(space), "--study", "x", url=pg_url, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("hpo: error: ") and named in line, line
    assert table_names(pg_url) == []  # the database as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # and the disk
