"""What pruning and staging saved, in `hpo status` and the report: epochs trained against a
search of the same budgets without pruning or deduplication, and time to accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from search.db import pipeline
from search.db.storage import open_storage
from tests.helpers import hpo, start_stub_worker, write_space

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
    space = write_space(tmp_path / "p.toml", SPACE)
    assert hpo("create", "--space", str(space), "--study", "p", url=url,
               cwd=tmp_path).returncode == 0
    worker = start_stub_worker("p", url=url, cwd=tmp_path, log=tmp_path / "w.log")
    assert worker.wait(timeout=600) == 0, (tmp_path / "w.log").read_text()[-3000:]

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
    assert (f"epochs: {total} trained; {without} without pruning or deduplication"
            f" ({without - total} saved)") in text, text
    # The final best, and the cumulative epochs at which the search first reached it.
    first = curve["epochs"][curve["best"].index(best)]
    assert "time to accuracy: " in text and f"{best:.4f} after {first} epochs" in text, text
    assert hpo("report", "p", "--out", str(tmp_path / "r.html"), url=url,
               cwd=tmp_path).returncode == 0
    page = (tmp_path / "r.html").read_text()
    assert "Time to accuracy" in page
    assert (f"<td><b>pipeline</b></td><td class=\"num\">{total}</td>"
            f"<td class=\"num\">{without}</td>") in page
