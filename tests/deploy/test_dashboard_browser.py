"""optuna-dashboard as a person sees it: `hpo dashboard` serving a study the workers wrote, loaded
in headless Chromium (Debian's package), which runs the page's JavaScript. The rendered page
lists the stage studies, a trial's page shows its intermediate values, and screenshots are saved
in the test's temporary folder for a person to look at.

No Chromium: skipped on a developer's machine, a failure in CI (CI set), which installs it.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tests.helpers import hpo_env, stop_process

STAGES = ("done/optimizer", "done/regularization")
STARTUP_SECONDS = 120
BROWSER_SECONDS = 120
# Time the page's scripts get to fetch and render, in Chromium's virtual time: it runs faster
# than this when the page goes idle sooner.
RENDER_MS = 15_000
WINDOW = (1280, 900)


def _chromium() -> str:
    path = next((p for name in ("chromium", "chromium-browser", "google-chrome")
                 if (p := shutil.which(name))), None)
    if path is None:
        reason = "Chromium is not installed (apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(
    finished_study: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`hpo dashboard done` as a real process; yields its base URL."""
    _chromium()  # skip (or fail in CI) before paying for the dashboard
    url, cwd = finished_study
    port = _free_port()
    log = tmp_path_factory.mktemp("dashboard-browser") / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "dashboard", "done", "--port", str(port),
             "--artifacts", str(cwd / "artifacts")],
            cwd=cwd, env=hpo_env(url), stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dashboard exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/meta", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no dashboard within {STARTUP_SECONDS}s:\n{log.read_text()}")
                time.sleep(0.5)
        yield base
    finally:
        stop_process(proc)


def browse(url: str, tmp: Path, *, screenshot: Path | None = None) -> str:
    """Load `url` in headless Chromium; the rendered DOM as visible text (or, with `screenshot`,
    save a PNG of the window instead and return "")."""
    profile = tmp / f"chromium-profile-{time.monotonic_ns()}"
    action = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        "--hide-scrollbars", f"--user-data-dir={profile}", f"--virtual-time-budget={RENDER_MS}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}", *action, url,
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_SECONDS)
    assert run.returncode == 0, f"chromium exited {run.returncode}:\n{run.stderr[-3000:]}"
    return "" if screenshot else visible_text(run.stdout)


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def assert_png(path: Path) -> None:
    """A real screenshot: a PNG of the window's size, with more than a blank page's bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert (width, height) == WINDOW
    assert len(data) > 8_000, f"{path} is {len(data)} bytes: an empty page?"


def js_number(value: float) -> str:
    """How the page's JavaScript prints a float (1 not 1.0, 1e-7 not 1e-07)."""
    if value.is_integer():
        return str(int(value))
    return repr(value).replace("e-0", "e-").replace("e+0", "e+")


def test_the_dashboard_lists_every_stage_study(dashboard: str, tmp_path: Path) -> None:
    text = browse(f"{dashboard}/dashboard/", tmp_path)
    for name in STAGES:
        assert name in text, f"{name} is not on the study list: {text[:2000]}"
    shot = tmp_path / "dashboard.png"
    browse(f"{dashboard}/dashboard/", tmp_path, screenshot=shot)
    assert_png(shot)


def test_a_trials_page_shows_its_intermediate_values(
    dashboard: str, finished_study: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = finished_study
    study = optuna.load_study(study_name=STAGES[0], storage=url)
    trial = next(t for t in study.trials
                 if t.state == TrialState.COMPLETE and len(t.intermediate_values) >= 2)
    with urllib.request.urlopen(f"{dashboard}/api/studies", timeout=10) as r:
        ids = {s["study_name"]: s["study_id"] for s in json.load(r)["study_summaries"]}
    page = f"{dashboard}/dashboard/studies/{ids[STAGES[0]]}/trials?numbers={trial.number}"

    text = browse(page, tmp_path)
    assert f"Trial {trial.number} (trial_id={trial._trial_id})" in text, text[:2000]
    # The per-epoch validation accuracy the worker reported, step by step, as the page shows it.
    steps = " ".join(f"{step} {js_number(value)}"
                     for step, value in sorted(trial.intermediate_values.items()))
    assert f"Intermediate Values {steps}" in text, text[:3000]
    shot = tmp_path / "trial.png"
    browse(page, tmp_path, screenshot=shot)
    assert_png(shot)
