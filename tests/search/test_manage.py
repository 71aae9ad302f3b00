"""Study management against real PostgreSQL, through the CLI: `hpo list` / `hpo status` alone,
`hpo best` by stage, `hpo extend`, `hpo enqueue` and `hpo delete`, their refusals (which change
nothing), and the stock Optuna tools (optuna-dashboard, the optuna CLI, `optuna.load_study`) on a
plain postgresql:// URL, with checkpoint artifacts that download as application/octet-stream."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search import cli
from search.db import pipeline, registry
from search.db.budget import BUDGET
from search.db.storage import open_storage
from tests.helpers import (
    ADMIN_URL,
    ROOT,
    create_database,
    database_url,
    drop_database,
    hpo,
    hpo_env,
    start_stub_worker,
    stop_process,
    tiny_space,
    write_space,
)
from tests.search.test_dashboard_api import _free_port
from tests.search.test_live_view import _tmux

TIMEOUT = 120  # generous: only limits how long a failure takes


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A finished two-stage study "m" on a fresh PostgreSQL database: (URL, plain URL, cwd)."""
    name = create_database("hpo_manage")
    url = database_url(name)
    cwd = tmp_path_factory.mktemp("manage")
    space = tiny_space(cwd / "tiny.toml", trials1=3, trials2=2)
    run = hpo("run", "--space", str(space), "--study", "m", "--workers", "1", "--threads", "1",
              "--device", "cpu", "--artifacts", str(cwd / "artifacts"), url=url, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    plain = make_url(ADMIN_URL).set(drivername="postgresql", database=name)
    yield url, plain.render_as_string(hide_password=False), cwd
    drop_database(name)


def _state(url: str) -> dict[str, Any]:
    """Everything a refused command must leave as it was."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                "pipelines": conn.execute(sa.select(registry.pipelines)).all(),
                "stages": conn.execute(sa.select(registry.stages)).all(),
                "trials": conn.execute(sa.text(
                    "SELECT study_id, number, state FROM trials ORDER BY trial_id")).all(),
                "attrs": conn.execute(sa.text(
                    "SELECT study_id, key, value_json FROM study_user_attributes"
                    " ORDER BY study_id, key")).all(),
            }
    finally:
        engine.dispose()


def _refused(*args: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`hpo ARGS` with no terminal on stdin, so a confirmation cannot be asked for."""
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd,
                          env=hpo_env(url), capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def _cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str,
         *args: str) -> tuple[int, str, str]:
    """`hpo ARGS` through the CLI's own entry point in this process: the same parsing, checks
    and exit status, without a Python start per command (stdin is pytest's, not a terminal)."""
    monkeypatch.setenv("HPO_STORAGE", url)
    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _get(url: str) -> tuple[bytes, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read(), response.headers


def test_stock_tools_open_a_plain_postgresql_url(done: tuple[str, str, Path]) -> None:
    _, plain, cwd = done
    assert plain.startswith("postgresql://")
    listed = subprocess.run([Path(sys.executable).parent / "optuna", "studies", "--storage",
                             plain], capture_output=True, text=True, timeout=TIMEOUT)
    assert listed.returncode == 0, listed.stderr
    assert "m/optimizer" in listed.stdout and "m/regularization" in listed.stdout
    study = optuna.load_study(study_name="m/optimizer", storage=plain)
    assert study.get_trials(states=(TrialState.COMPLETE,))

    port = _free_port()
    log = cwd / "stock-dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [Path(sys.executable).parent / "optuna-dashboard", plain, "--port", str(port),
             "--artifact-dir", str(cwd / "artifacts" / "store")],
            stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                body, _ = _get(base + "/api/studies")
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        ids = {s["study_name"]: s["study_id"] for s in json.loads(body)["study_summaries"]}
        assert {"m/optimizer", "m/regularization"} <= set(ids)
        body, _ = _get(f"{base}/api/studies/{ids['m/optimizer']}")
        trials = [t for t in json.loads(body)["trials"] if t["state"] == "Complete"]
        assert trials
        trial = trials[0]
        artifact = trial["artifacts"][0]
        assert artifact["mimetype"] == "application/octet-stream"
        assert artifact["filename"] == f"m-optimizer-trial{trial['number']}.pt"
        data, headers = _get(f"{base}/artifacts/{ids['m/optimizer']}/{trial['trial_id']}/"
                             f"{artifact['artifact_id']}")
        assert headers["Content-Type"] == "application/octet-stream"
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert data == Path(attrs["checkpoint"]).read_bytes()
    finally:
        stop_process(proc)


def test_list_and_status_alone_show_each_study(done: tuple[str, str, Path]) -> None:
    url, _, cwd = done
    best = json.loads(hpo("best", "m", "--json", url=url, cwd=cwd).stdout)["value"]
    for args in (("list",), ("status",)):
        out = hpo(*args, url=url, cwd=cwd)
        assert out.returncode == 0, out.stderr
        row = next(line for line in out.stdout.splitlines() if line.startswith("m "))
        assert "done" in row and f"{best:.4f}" in row


def test_best_prints_the_searched_parameters_by_stage(done: tuple[str, str, Path]) -> None:
    url, _, cwd = done
    info = json.loads(hpo("best", "m", "--json", url=url, cwd=cwd).stdout)
    short = hpo("best", "m", url=url, cwd=cwd)
    assert short.returncode == 0, short.stderr
    lines = short.stdout.splitlines()
    optimizer = next(line for line in lines if line.strip().startswith("optimizer"))
    assert "lr = " in optimizer and "momentum = " in optimizer
    assert any(line.strip().startswith("regularization") for line in lines)
    assert f"test_acc {info['test']['test_acc']:.4f}" in short.stdout
    assert "config:" not in short.stdout and "width" not in short.stdout
    every = hpo("best", "m", "--all", url=url, cwd=cwd)
    assert "config:" in every.stdout and "model = 'resnet20'" in every.stdout


REFUSED = {
    "extend a closed earlier stage": (
        ("extend", "m", "--stage", "optimizer", "--trials", "9"), "cannot extend"),
    "extend to a lower budget": (
        ("extend", "m", "--stage", "regularization", "--trials", "1"), "only raises"),
    "extend an unknown stage": (
        ("extend", "m", "--stage", "nope", "--trials", "9"), "no such stage"),
    "enqueue an out-of-range value": (
        ("enqueue", "m", "--stage", "regularization", "--params",
         '{"label_smoothing": 0.9}'), "outside the stage's range"),
    "enqueue a parameter of another stage": (
        ("enqueue", "m", "--stage", "regularization", "--params", '{"lr": 0.1}'),
        "not searched in stage"),
    "enqueue a wrong type": (
        ("enqueue", "m", "--stage", "regularization", "--params",
         '{"weight_decay": "high"}'), "weight_decay"),
    "enqueue bad JSON": (
        ("enqueue", "m", "--stage", "regularization", "--params", "{lr: 1}"), "not valid JSON"),
    "enqueue into a closed earlier stage": (
        ("enqueue", "m", "--stage", "optimizer", "--params", '{"lr": 0.1}'), "cannot enqueue"),
    "enqueue into a full stage": (
        ("enqueue", "m", "--stage", "regularization", "--params",
         '{"label_smoothing": 0.1}'), "no free slot"),
    "delete without confirmation or a terminal": (("delete", "m"), "confirm with --yes"),
    "delete an unknown study": (("delete", "nope", "--yes"), "no study named"),
}


def test_refusals_say_why_and_change_nothing(
    done: tuple[str, str, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, _, cwd = done
    monkeypatch.chdir(cwd)
    before = _state(url)
    for what, (args, message) in REFUSED.items():
        code, out, err = _cli(capsys, monkeypatch, url, *args)
        assert code == 2, (what, out, err)
        assert message in err and "Traceback" not in err, (what, err)
        assert len(err.strip().splitlines()) == 1, (what, err)
    assert _state(url) == before
    # The same refusal from a real process, whose stdin is no terminal either.
    out = _refused("delete", "m", url=url, cwd=cwd)
    assert out.returncode == 2 and "confirm with --yes" in out.stderr, out.stderr
    assert _state(url) == before
    assert (cwd / "artifacts" / "m").is_dir()


def test_extend_the_last_stage_and_enqueue_a_configuration(done: tuple[str, str, Path]) -> None:
    url, _, cwd = done
    storage = open_storage(url)
    pipe = pipeline.load(storage, "m")
    study = pipeline.load_stage_study(storage, "m", pipe.stages[1])
    budget = pipeline.counts(study).finished + 1
    out = hpo("extend", "m", "--stage", "regularization", "--trials", str(budget), url=url,
              cwd=cwd)
    assert out.returncode == 0, out.stderr
    status = json.loads(hpo("status", "m", "--json", url=url, cwd=cwd).stdout)
    assert status["stages"][1]["budget"] == budget
    again = hpo("create", "--space", str(cwd / "tiny.toml"), "--study", "m", url=url, cwd=cwd)
    assert again.returncode == 0 and "exists, unchanged" in again.stdout, again.stderr
    study = pipeline.load_stage_study(storage, "m", pipe.stages[1])
    assert study.user_attrs[BUDGET] == budget  # create with the original file keeps it

    params = {"label_smoothing": 0.15, "weight_decay": 0.0005}
    out = hpo("enqueue", "m", "--stage", "regularization", "--params", json.dumps(params),
              url=url, cwd=cwd)
    assert out.returncode == 0, out.stderr
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs["enqueued_by"] == "user"
    number = waiting[0].number

    worker = hpo("worker", "--study", "m", "--device", "cpu", "--threads", "1", "--artifacts",
                 str(cwd / "artifacts"), url=url, cwd=cwd)
    assert worker.returncode == 0, worker.stderr[-3000:]
    trained = study.trials[number]
    assert trained.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert trained.params == params
    assert trained.user_attrs["config"]["label_smoothing"] == 0.15
    assert pipeline.counts(study).finished == budget
    shown = hpo("status", "m", url=url, cwd=cwd)
    assert "enqueued by a user 1" in shown.stdout, shown.stdout


FINITE = """
    dataset = "digits"
    [fixed]
    model = "resnet20"
    [[stage]]
    name = "architecture"
    trials = 3
    epochs = 1
    [stage.params]
    width = { choices = [0.25, 0.5] }
    se = { choices = [false, true] }
"""


def test_a_finite_stage_refuses_a_held_configuration_and_a_budget_past_its_size(
    tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    space = write_space(tmp_path / "finite.toml", FINITE)
    assert hpo("create", "--space", str(space), "--study", "f", url=url,
               cwd=tmp_path).returncode == 0
    one = json.dumps({"width": 0.25, "se": False})
    queued = hpo("enqueue", "f", "--stage", "architecture", "--params", one, url=url, cwd=tmp_path)
    assert queued.returncode == 0, queued.stderr
    again = hpo("enqueue", "f", "--stage", "architecture", "--params", one, url=url, cwd=tmp_path)
    assert again.returncode == 2
    assert "trial #0 (waiting) holds" in again.stderr, again.stderr
    # Values left to the sampler may still be queued (a repeat is caught when it would train).
    part = hpo("enqueue", "f", "--stage", "architecture", "--params", '{"width": 0.25}', url=url,
               cwd=tmp_path)
    assert part.returncode == 0, part.stderr
    past = hpo("extend", "f", "--stage", "architecture", "--trials", "5", url=url, cwd=tmp_path)
    assert past.returncode == 2 and "4 distinct configurations" in past.stderr, past.stderr
    up = hpo("extend", "f", "--stage", "architecture", "--trials", "4", url=url, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    study = pipeline.load_stage_study(open_storage(url), "f",
                                      pipeline.load(open_storage(url), "f").stages[0])
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 2
    assert study.user_attrs[BUDGET] == 4


def test_delete_waits_for_live_workers_then_removes_everything(
    done: tuple[str, str, Path]
) -> None:
    url, _, cwd = done
    space = tiny_space(cwd / "busy.toml", trials1=200, trials2=2)
    assert hpo("create", "--space", str(space), "--study", "busy", url=url,
               cwd=cwd).returncode == 0
    storage = open_storage(url)
    worker = start_stub_worker("busy", url=url, cwd=cwd, log=cwd / "busy-worker.log",
                               STUB_EPOCH_SECONDS="0.2")
    try:
        first = pipeline.load_stage_study(storage, "busy", pipeline.load(storage, "busy").stages[0])
        deadline = time.monotonic() + TIMEOUT
        while not first.get_trials(states=(TrialState.COMPLETE,)):
            assert worker.poll() is None, (cwd / "busy-worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        refused = hpo("delete", "busy", "--yes", "--artifacts", str(cwd / "artifacts"), url=url,
                      cwd=cwd)
        assert refused.returncode == 2 and "live worker" in refused.stderr, refused.stderr
        assert registry.get_pipeline_row(storage.engine, "busy") is not None
        assert {"busy/optimizer", "busy/regularization"} <= {
            s.study_name for s in optuna.get_all_study_summaries(storage)}
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=TIMEOUT) == 0
    store = cwd / "artifacts" / "store"
    artifacts = [a.artifact_id for t in first.get_trials(states=(TrialState.COMPLETE,))
                 for a in optuna.artifacts.get_all_artifact_meta(t, storage=storage)]
    assert artifacts and all((store / a).is_file() for a in artifacts)
    kept = sorted(p.name for p in store.iterdir() if p.name not in artifacts)

    out = hpo("delete", "busy", "--yes", "--artifacts", str(cwd / "artifacts"), url=url, cwd=cwd)
    assert out.returncode == 0, out.stderr
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert not any(n.startswith("busy/") for n in names) and "m/optimizer" in names
    engine = storage.engine
    with engine.connect() as conn:
        for table, column in ((registry.pipelines, "name"), (registry.stages, "pipeline"),
                              (registry.workers, "pipeline")):
            assert not conn.execute(sa.select(table).where(table.c[column] == "busy")).all()
    assert not (cwd / "artifacts" / "busy").exists()
    assert sorted(p.name for p in store.iterdir()) == kept  # study m's checkpoints stay
    assert (cwd / "artifacts" / "m").is_dir() and pipeline.load(storage, "m")


def test_status_says_why_trials_did_not_complete(done: tuple[str, str, Path]) -> None:
    """Trials as the worker records each outcome (search/runtime/worker.py), written through
    Optuna."""
    url, _, cwd = done
    space = tiny_space(cwd / "why.toml", trials1=8, trials2=2)
    assert hpo("create", "--space", str(space), "--study", "why", url=url,
               cwd=cwd).returncode == 0
    storage = open_storage(url)
    study = pipeline.load_stage_study(storage, "why", pipeline.load(storage, "why").stages[0])
    dist = {"lr": optuna.distributions.FloatDistribution(0.02, 0.4, log=True)}

    def add(state: TrialState, steps: int, **attrs: Any) -> None:
        study.add_trial(optuna.trial.create_trial(
            state=state, params={"lr": 0.1}, distributions=dist, user_attrs=attrs,
            value=0.5 if state == TrialState.COMPLETE else None,
            intermediate_values={s: 0.1 for s in range(1, steps + 1)}))

    add(TrialState.COMPLETE, 2)
    add(TrialState.PRUNED, 1)  # the median pruner: no reason recorded
    add(TrialState.PRUNED, 1, fail_reason="oom", error="CUDA out of memory")
    add(TrialState.FAIL, 1, fail_reason="error", error="ValueError: boom")
    add(TrialState.FAIL, 1, fail_reason="interrupted", error="interrupted at epoch 1")
    add(TrialState.FAIL, 0)  # failed by a reaper: its worker stopped beating
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params={"lr": 0.1}, distributions=dist,
        user_attrs={"retry_of": 4, "root": 4, "crashes": 0}))

    out = hpo("status", "why", url=url, cwd=cwd)
    assert out.returncode == 0, out.stderr
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("optimizer"))
    assert row[2:6] == ["1", "2", "2", "1"]  # complete, pruned, failed (not the hand-back), queued
    why = next(line for line in out.stdout.splitlines() if line.startswith("  optimizer:"))
    assert "pruned 2 (median pruner 1, out of memory 1; 2 epochs saved)" in why
    assert "failed 2 (worker lost 1; error: ValueError: boom)" in why
    assert "handed back 1 (resumed as #6)" in why
    table = json.loads(hpo("status", "why", "--json", url=url, cwd=cwd).stdout)
    assert table["stages"][0]["outcomes"] == {
        "complete": 1, "median pruner": 1, "out of memory": 1, "error": 1, "handed back": 1,
        "worker lost": 1}

    watch = _refused("status", "m", "--watch", url=url, cwd=cwd)  # a done study: it returns
    assert watch.returncode == 0, watch.stderr
    assert "m: finished" in watch.stdout and "\x1b" not in watch.stdout


def test_delete_asks_on_a_terminal(done: tuple[str, str, Path]) -> None:
    """Under a real terminal (tmux) `hpo delete` asks; "n" keeps the study, "y" removes it."""
    url, _, cwd = done
    tmux = _tmux()
    space = tiny_space(cwd / "ask.toml")
    assert hpo("create", "--space", str(space), "--study", "ask", url=url,
               cwd=cwd).returncode == 0
    storage = open_storage(url)
    sock = f"hpo-ask-{uuid.uuid4().hex[:8]}"
    env = hpo_env(url)
    for answer, kept in (("n", True), ("y", False)):
        done_file = cwd / f"asked-{answer}"
        script = cwd / "ask.sh"
        script.write_text(
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()
                    if k.startswith(("HPO_", "PYTHON", "PATH", "HOME", "LANG")))
            + f"cd {shlex.quote(str(ROOT))}\n{shlex.quote(sys.executable)} -m search.cli delete"
            f" ask --artifacts {cwd / 'artifacts'}; echo $? > {done_file}; sleep 300\n")
        subprocess.run([tmux, "-L", sock, "new-session", "-d", "-s", answer, "-x", "200",
                        f"bash {script}"], check=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while "[y/N]" not in _pane(tmux, sock, answer):
                assert time.monotonic() < deadline, _pane(tmux, sock, answer)
                time.sleep(0.2)
            assert "study 'ask': 2 stage studies" in _pane(tmux, sock, answer)
            subprocess.run([tmux, "-L", sock, "send-keys", "-t", answer, answer, "Enter"],
                           check=True)
            while not done_file.exists():
                assert time.monotonic() < deadline, _pane(tmux, sock, answer)
                time.sleep(0.2)
        finally:
            subprocess.run([tmux, "-L", sock, "kill-session", "-t", answer], check=False)
        assert done_file.read_text().strip() == ("1" if kept else "0")
        assert (registry.get_pipeline_row(storage.engine, "ask") is not None) == kept
    subprocess.run([tmux, "-L", sock, "kill-server"], check=False)


def _pane(tmux: str, sock: str, target: str) -> str:
    return subprocess.run([tmux, "-L", sock, "capture-pane", "-p", "-t", target],
                          capture_output=True, text=True, check=True).stdout
