"""What pruning, early stopping and staging saved, in `hpo status` and the report: epochs
trained against a search of the same budgets without pruning or deduplication, and time to
accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from optuna.trial import TrialState

from search.db import pipeline
from search.db.attrs import EARLY_STOPPED, GRAD_NORM
from search.db.storage import open_storage
from tests.helpers import hpo, run_stub_study, start_worker, write_space

SPACE = """
    dataset = "digits"
    [[stage]]
    name = "optimizer"
    trials = 8
    epochs = 4
    pruner = { startup_trials = 2, warmup_epochs = 1 }
    [stage.params]
    lr = { low = 0.0001, high = 1.0, log = true }
    [[stage]]
    name = "width"
    trials = 6
    epochs = 3
    pruner = { type = "none" }
    [stage.params]
    width = { choices = [0.25, 0.5] }
"""


def test_status_and_report_show_the_epochs_saved_and_time_to_accuracy(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    run_stub_study(write_space(tmp_path / "p.toml", SPACE), "p", url=url, cwd=tmp_path)

    storage = open_storage(url)
    pipe = pipeline.load(storage, "p")
    trials = {s.name: pipeline.load_stage_study(storage, "p", s).get_trials() for s in pipe.stages}
    info = json.loads(hpo("status", "p", "--json", url=url, cwd=tmp_path).stdout)
    for stage, row in zip(pipe.stages, info["stages"], strict=True):
        assert row["epochs_trained"] == sum(len(t.intermediate_values) for t in trials[stage.name])
        assert row["epochs_without"] == stage.trials * stage.epochs
    # The finite stage trained each of its 2 configurations once, in a budget of 6.
    assert info["stages"][1]["epochs_trained"] == 2 * 3
    curve = info["time_to_accuracy"]["pipeline"]
    total = sum(row["epochs_trained"] for row in info["stages"])
    assert curve["epochs"] == sorted(curve["epochs"]) and curve["epochs"][-1] == total
    assert curve["best"] == sorted(curve["best"])  # the best so far never falls (maximize)
    best = max(t.value for ts in trials.values() for t in ts if t.value is not None)
    assert curve["best"][-1] == best

    text = hpo("status", "p", url=url, cwd=tmp_path).stdout
    without = sum(row["epochs_without"] for row in info["stages"])
    # The pruner's share of the saving beside it (the rest: the finite stage's deduplication).
    pruned = sum(row["epochs_saved"] for row in info["stages"])
    assert pruned > 0 and info["stages"][0]["pruned"] > 0
    assert (f"epochs: {total} trained; {without} without pruning or deduplication"
            f" ({without - total} saved; pruning {pruned})") in text, text
    # The final best, and the cumulative epochs at which the search first reached it.
    first = curve["epochs"][curve["best"].index(best)]
    assert "time to accuracy: " in text and f"{best:.4f} after {first} epochs" in text, text
    assert hpo("report", "p", "--out", str(tmp_path / "r.html"), url=url,
               cwd=tmp_path).returncode == 0
    page = (tmp_path / "r.html").read_text()
    assert "Time to accuracy" in page
    assert (f"<td><b>pipeline</b></td><td class=\"num\">{total}</td>"
            f"<td class=\"num\">{without}</td>") in page


# A constant, high rate on digits (no decay, no warm-up): validation accuracy climbs, then
# wanders, so a patience of 1 or 2 (searched) ends most trials well before their 10 epochs.
EARLY_STOP_SPACE = """
    dataset = "digits"
    [fixed]
    model = "resnet20"
    width = 0.25
    crop_pad = 0
    batch_size = 64
    lr_floor = 1.0
    warmup_epochs = 0.0
    [[stage]]
    name = "optimizer"
    trials = 3
    epochs = 10
    pruner = { type = "none" }
    sampler = { startup_trials = 3 }
    [stage.params]
    lr = { low = 0.3, high = 0.6 }
    early_stop_patience = { choices = [1, 2] }
"""


def test_early_stopped_trials_complete_and_their_savings_show_in_status_and_report(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    space = write_space(tmp_path / "p.toml", EARLY_STOP_SPACE)
    assert hpo("create", "--space", str(space), "--study", "es", url=url,
               cwd=tmp_path).returncode == 0
    worker = start_worker("es", url=url, cwd=tmp_path, log=tmp_path / "w.log")
    assert worker.wait(timeout=600) == 0, (tmp_path / "w.log").read_text()[-3000:]

    storage = open_storage(url)
    stage = pipeline.load(storage, "es").stages[0]
    trials = pipeline.load_stage_study(storage, "es", stage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3  # stopped early, not pruned
    stops = {}
    for t in trials:
        epochs = t.user_attrs["epochs"]
        trained = len(t.intermediate_values)
        assert [e["epoch"] for e in epochs] == list(range(1, trained + 1))
        accs = [e["val_acc"] for e in epochs]
        # The objective is the best epoch's value, the kept one; the earliest of equals.
        assert t.value == max(accs) and t.user_attrs["metrics"]["best_epoch"] == \
            accs.index(max(accs)) + 1
        patience = t.params["early_stop_patience"]
        if EARLY_STOPPED in t.user_attrs:
            stops[t.number] = t.user_attrs[EARLY_STOPPED]
            assert t.user_attrs[EARLY_STOPPED] == trained < stage.epochs
            assert trained - (accs.index(max(accs)) + 1) == patience
        else:
            assert trained == stage.epochs
        # The dashboard's summary of the trial's gradient norms, from its epochs.
        norms = t.user_attrs[GRAD_NORM]
        assert norms["max"] == max(e["grad_norm_max"] for e in epochs) >= norms["mean"] > 0
    assert stops, "no trial stopped early: this space should plateau within 10 epochs"

    info = json.loads(hpo("status", "es", "--json", url=url, cwd=tmp_path).stdout)
    row = info["stages"][0]
    saved = sum(stage.epochs - e for e in stops.values())
    assert (row["early_stopped"], row["epochs_early_stopped"]) == (len(stops), saved)
    assert row["epochs_trained"] == 3 * stage.epochs - saved and row["epochs_saved"] == 0
    text = hpo("status", "es", url=url, cwd=tmp_path).stdout
    trials_word = "trial" if len(stops) == 1 else "trials"
    assert (f"({saved} saved; early stopping {saved} in {len(stops)} {trials_word})"
            in text), text
    assert f"early stopped {len(stops)} ({saved} epochs saved)" in text, text

    assert hpo("report", "es", "--out", str(tmp_path / "r.html"), url=url,
               cwd=tmp_path).returncode == 0
    page = (tmp_path / "r.html").read_text()
    assert "<th>of which by early stopping</th>" in page
    assert f"<td>{saved} ({len(stops)} {trials_word})</td>" in page
    # Each trial's gradient norms per epoch beside the stage's curves, and by depth.
    assert "<h3>Gradient norm per epoch</h3>" in page and '<section id="gradients">' in page
