"""`hpo report`: one self-contained HTML file from a finished study, a fresh one, and a refusal
for an unknown study, all through the CLI as a real process."""

from __future__ import annotations

import re
from pathlib import Path

from plotly.offline import get_plotlyjs

from search.db import pipeline
from search.db.storage import open_storage
from search.results.best import best
from search.results.report import format_value
from tests.helpers import hpo, tiny_space


def _section(page: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', page, re.S)
    assert match, f"no section {section_id!r} in the report"
    return match.group(1)


def test_report_of_a_finished_study_is_self_contained(
    finished_study: tuple[str, Path], tmp_path: Path
) -> None:
    url, cwd = finished_study
    out = tmp_path / "report.html"
    run = hpo("report", "done", "--out", str(out), url=url, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    page = out.read_text(encoding="utf-8")

    # Opens offline: plotly.js inline exactly once, and nothing fetched from the network.
    plotly_js = get_plotlyjs()
    assert page.count(plotly_js) == 1
    assert not re.search(r"<script[^>]*\bsrc=", page)
    # plotly.js itself names its CDN (map data); the figures around it must not.
    assert "cdn.plot.ly" not in page.replace(plotly_js, "")

    assert "<h1>Study done: val_acc (maximize)</h1>" in page
    for stage in ("optimizer", "regularization"):
        assert f"done/{stage}" in page
        section = _section(page, f"stage-{stage}")
        history = section.split("<h3>Optimization history</h3>", 1)[1].split("<h3>", 1)[0]
        assert "Plotly.newPlot" in history and "Optimization History Plot" in history
        # Every trial's gradient norm per epoch (the trainer records them), beside its curves.
        norms = section.split("<h3>Gradient norm per epoch</h3>", 1)[1].split("<h3>", 1)[0]
        assert "Plotly.newPlot" in norms and f"Gradient norm per epoch, {stage}" in norms
    # Each finished trial's mean gradient norm by model depth: this study trains resnet20 only.
    by_depth = _section(page, "gradients")
    assert "Plotly.newPlot" in by_depth and '"type":"box"' in by_depth
    assert '"name":"resnet20"' in by_depth and "not the effect of depth alone" in by_depth

    storage = open_storage(url)
    info = best(storage, "done", pipeline.load(storage, "done"))
    best_part = _section(page, "best")
    assert f"<td>test accuracy (test_acc)</td><td class=\"num\">" \
           f"{format_value(info['test']['test_acc'])}</td>" in best_part
    assert f"trial #{info['trial']}" in best_part
    assert "Confusion matrix" in best_part and '"type":"heatmap"' in best_part
    classes = len(info["test"]["confusion"])
    assert best_part.count("<td class=\"num\">") >= 3 + 2 * classes  # metrics + per-class F1
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed, not left behind


def test_report_of_an_unknown_study_writes_nothing(
    finished_study: tuple[str, Path], tmp_path: Path
) -> None:
    url, cwd = finished_study
    out = tmp_path / "nope.html"
    run = hpo("report", "nosuchstudy", "--out", str(out), url=url, cwd=cwd)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuchstudy" in lines[0], run.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_report_of_a_study_without_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    space = tiny_space(tmp_path / "tiny.toml")
    created = hpo("create", "--space", str(space), "--study", "fresh", url=url, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    out = tmp_path / "fresh.html"
    run = hpo("report", "fresh", "--out", str(out), url=url, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    page = out.read_text(encoding="utf-8")
    assert "fresh/optimizer" in page and "fresh/regularization" in page
    assert "No trial has completed yet" in _section(page, "best")
    assert "Not drawn: no complete trial yet." in _section(page, "stage-optimizer")
