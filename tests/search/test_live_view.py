"""The live view of `hpo run` as a user sees it: under a real terminal (tmux), the screen shows a
bar per stage and the best value while the search runs, and a short summary after; written to a
pipe, it is plain lines without escape codes, one per finished trial, and `-v` adds the per-epoch
lines that otherwise stay in the log file."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from search.db import pipeline
from search.db.storage import open_storage
from tests.helpers import ROOT, hpo, hpo_env, tiny_space

SCREEN_SECONDS = 300  # generous: a failure only takes longer to report
EPOCH_LINE = re.compile(r"trial \d+ epoch \d+/\d+: val_acc")


def _ended_trials(url: str, study: str) -> int:
    storage = open_storage(url)
    pipe = pipeline.load(storage, study)
    return sum(1 for s in pipe.stages
               for t in pipeline.load_stage_study(storage, study, s).get_trials()
               if t.state.is_finished())


def _save(tmp_path: Path, name: str, text: str) -> Path:
    """A capture, kept with the test's output (HPO_TEST_CAPTURES, else the test's tmp folder)."""
    folder = Path(os.environ.get("HPO_TEST_CAPTURES", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    print(f"--- {path} ---\n{text}")
    return path


def test_plain_output_has_no_escape_codes_and_one_line_per_trial(
    pg_url: str, tmp_path: Path
) -> None:
    space = tiny_space(tmp_path / "tiny.toml", trials1=3, trials2=2)
    run = hpo("run", "--space", str(space), "--study", "plain", "--workers", "2", "--device",
              "cpu", "--threads", "1", "--artifacts", str(tmp_path / "artifacts"), "-v",
              url=pg_url, cwd=tmp_path)
    _save(tmp_path, "plain-stdout.txt", run.stdout)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\x1b" not in run.stdout and "\x1b" not in run.stderr
    lines = run.stdout.splitlines()
    log = tmp_path / "artifacts" / "plain" / "run.log"
    assert f"per-epoch log in {log}" in lines[0]
    finished = [line for line in lines if re.match(r"\[\d+m\d\ds\] \w+ #\d+: ", line)]
    assert len(finished) == _ended_trials(pg_url, "plain")
    # -v: the workers' per-epoch lines on screen too; they are in the log either way.
    assert any(EPOCH_LINE.search(line) for line in lines)
    assert EPOCH_LINE.search(log.read_text())
    summary = lines[lines.index(next(x for x in lines if x.startswith("plain: finished"))):]
    assert len(summary) <= 30
    best = json.loads(hpo("best", "plain", "--json", url=pg_url, cwd=tmp_path).stdout)
    assert f"val_acc = {best['value']:.4f}" in run.stdout
    assert "hpo report plain" in run.stdout and "hpo export plain" in run.stdout


def _tmux() -> str:
    found = shutil.which("tmux")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tmux is not installed (CI installs it in .ci/run)")
        pytest.skip("tmux is not installed (apt-get install tmux)")
    return found


def test_live_view_under_a_terminal_shows_stage_bars_and_the_best(
    pg_url: str, tmp_path: Path
) -> None:
    tmux = _tmux()
    sock = f"hpo-test-{uuid.uuid4().hex[:8]}"
    space = tiny_space(tmp_path / "tiny.toml", trials1=3, trials2=2)
    env = hpo_env(pg_url)
    rc = tmp_path / "rc"
    script = tmp_path / "run.sh"
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()
                      if k.startswith(("HPO_", "PYTHON", "PATH", "HOME", "LANG", "LC_")))
    script.write_text(
        f"{exports}cd {shlex.quote(str(tmp_path))}\n"
        f"{shlex.quote(sys.executable)} -m search.cli run --space {space} --study live"
        f" --workers 2 --device cpu --threads 1 --artifacts {tmp_path / 'artifacts'}\n"
        f"echo $? > {rc}\nsleep 600\n"
    )
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([tmux, "-L", sock, "new-session", "-d", "-s", "hpo", "-x", "150", "-y", "45",
                    f"bash {script}"], check=True, env=env)

    def screen() -> str:
        return subprocess.run([tmux, "-L", sock, "capture-pane", "-p", "-t", "hpo"],
                              capture_output=True, text=True, check=True).stdout

    try:
        during, deadline = "", time.monotonic() + SCREEN_SECONDS
        while time.monotonic() < deadline and not rc.exists():
            text = screen()
            bars = [line for line in text.splitlines() if "━" in line]
            if len(bars) == 2 and "best so far: 0." in text:
                during = text
                break
            time.sleep(0.2)
        _save(tmp_path, "screen-during.txt", during)
        assert during, "no capture showed both stage bars and a best value while it ran"
        bars = [line for line in during.splitlines() if "━" in line]
        assert bars[0].startswith("optimizer") and "/3" in bars[0]
        assert bars[1].startswith("regularization") and "/2" in bars[1]
        assert re.search(r"worker \d+\s+cpu", during)

        while time.monotonic() < deadline and not rc.exists():
            time.sleep(0.5)
        assert rc.exists() and rc.read_text().strip() == "0", screen()
        after = screen()
        _save(tmp_path, "screen-after.txt", after)
    finally:
        subprocess.run([tmux, "-L", sock, "kill-server"], check=False)
    best = json.loads(hpo("best", "live", "--json", url=pg_url, cwd=tmp_path).stdout)
    assert f"{best['value']:.4f}" in after
    assert "live: finished" in after and "optimizer" in after and "regularization" in after
    shown = after.rstrip().splitlines()
    assert len(shown) <= 30, after
    assert not any(EPOCH_LINE.search(line) for line in shown)  # they are in the log, not here
    assert EPOCH_LINE.search((tmp_path / "artifacts" / "live" / "run.log").read_text())
