"""docker-compose.yml run without Docker: each service's command as a local process with the
service's environment, interpolated from .env.example exactly as `docker compose` would, with the
local PostgreSQL standing in for the `postgres` service and temporary folders for the container's
mounts. `create`, then three `worker`s (one stopped with SIGTERM, as `docker compose down` does),
then `hpo` and `dashboard`, to the end of a small pipeline. A command, flag or variable in the
compose file that the CLI does not understand fails this test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from sqlalchemy.engine import make_url

from search.db import pipeline
from search.db.storage import open_storage
from tests.deploy import (
    SECRETS_DIR,
    environment,
    image_env,
    load_compose,
    read_env_file,
    secret_paths,
    service,
    volume_targets,
)
from tests.helpers import stop_process, tiny_space

STUDY = "fleet"
# The only deviations from the compose file's environment: this machine has no GPU (the file
# says cuda:free) and two shared cores (one PyTorch thread per worker).
NO_GPU = {"HPO_DEVICE": "cpu", "HPO_THREADS": "1"}
WORKERS = 3
STARTUP_SECONDS = 120
PIPELINE_SECONDS = 420


def container_paths(tmp: Path) -> dict[str, Path]:
    """Each path the services mount (and the image's working folder) and the temporary folder
    that plays it here. Longest first, so a file inside a mapped folder maps as itself."""
    paths = {
        "/run/secrets/db_password": tmp / "secrets" / "db_password",
        "/home/hpo/.cache/torch": tmp / "torch-cache",
        "/workspace": tmp / "workspace",
        "/artifacts": tmp / "artifacts",
        "/export": tmp / "export",
        "/spaces": tmp / "spaces",
        "/locks": tmp / "locks",
        "/data": tmp / "data",
    }
    return dict(sorted(paths.items(), key=lambda kv: -len(kv[0])))


def to_host(value: str, paths: dict[str, Path]) -> str:
    for inside, outside in paths.items():
        if value == inside or value.startswith(inside + "/"):
            return str(outside) + value[len(inside):]
    return value


class Compose:
    """docker-compose.yml's services as local processes in `tmp`."""

    def __init__(self, tmp: Path, dotenv: dict[str, str]) -> None:
        self.dotenv, self.file = dotenv, load_compose()
        self.paths = container_paths(tmp)
        for inside, here in self.paths.items():
            folder = here.parent if inside.startswith(SECRETS_DIR + "/") else here
            folder.mkdir(parents=True, exist_ok=True)
        # The image's working folder holds `data`, a link to the /data volume (docker/Dockerfile).
        (self.paths["/workspace"] / "data").symlink_to(self.paths["/data"])

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        """The service's command line and environment, as its container would get them."""
        svc = service(self.file, name, self.dotenv)
        own = environment(svc)
        mounted = set(volume_targets(svc)) | secret_paths(svc)
        # A container path in the service's own command or environment must be mounted there;
        # otherwise mapping it to a temporary folder would hide a broken compose file.
        for value in [*svc["command"], *own.values()]:
            inside = next((p for p in self.paths if value == p or value.startswith(p + "/")), None)
            if inside is not None:
                assert inside in mounted, f"service {name} uses {value} but does not mount {inside}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
        env = {**base, **image_env(), **own}
        env = {k: to_host(v, self.paths) for k, v in env.items()}
        return [to_host(a, self.paths) for a in svc["command"]], env

    def start(self, log: Path, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                [sys.executable, "-m", "search.cli", *cmd], cwd=self.paths["/workspace"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def run(self, name: str, log: Path, timeout: float = STARTUP_SECONDS) -> str:
        """Run a one-shot service to completion; its output."""
        cmd, env = self.command(name)
        proc = self.start(log, cmd, env)
        try:
            code = proc.wait(timeout)
        finally:
            stop_process(proc)
        assert code == 0, f"service {name} exited {code}:\n{log.read_text()[-3000:]}"
        return log.read_text()


def wait_for(logs: list[Path], pattern: str, procs: list[subprocess.Popen], timeout: float) -> int:
    """Index of the first log in which `pattern` appears; fails on timeout or if all exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, log in enumerate(logs):
            if log.exists() and re.search(pattern, log.read_text()):
                return i
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in logs)
    raise AssertionError(f"no {pattern!r} within {timeout:.0f}s:\n{tails}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grace_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", text))


def test_compose_services_run_a_staged_search_as_local_processes(
    pg_url: str, tmp_path: Path
) -> None:
    db = make_url(pg_url)
    dotenv = {
        **read_env_file(),  # `cp .env.example .env`, then the user's edits:
        "HPO_STUDY": STUDY,
        "HPO_SPACE": "tiny.toml",
        # The local server plays the `postgres` service: its address, this test's database.
        "HPO_DB_HOST": db.host or "127.0.0.1",
        "HPO_DB_PORT": str(db.port or 5432),
        "HPO_DB_NAME": str(db.database),
        "HPO_DB_USER": db.username or "postgres",
    }
    compose = Compose(tmp_path, dotenv)
    # A trust-auth server ignores the password; a server that wants one gets the test's.
    compose.paths["/run/secrets/db_password"].write_text((db.password or "unused-by-trust") + "\n")
    tiny_space(compose.paths["/spaces"] / "tiny.toml", trials1=3, trials2=2, epochs=2)
    logs = tmp_path / "logs"
    logs.mkdir()

    # create: once, and again as every `docker compose up` does, which changes nothing.
    assert f"created study {STUDY!r}" in compose.run("create", logs / "create-1.log")
    assert "exists, unchanged" in compose.run("create", logs / "create-2.log")

    # worker x3, as `--scale worker=3`; the first to be mid-trial is stopped like `down` does.
    cmd, env = compose.command("worker")
    for key, value in NO_GPU.items():
        assert key in env, f"the worker service no longer sets {key}"
        env[key] = value
    worker_logs = [logs / f"worker-{i + 1}.log" for i in range(WORKERS)]
    workers = [compose.start(log, cmd, env) for log in worker_logs]
    try:
        grace = grace_seconds(str(compose.file["services"]["worker"]["stop_grace_period"]))
        stopped = wait_for(worker_logs, r"epoch 1/2", workers, PIPELINE_SECONDS)
        workers[stopped].send_signal(signal.SIGTERM)
        # Within the grace period compose gives it before SIGKILL (wait raises past it).
        code = workers[stopped].wait(grace)
        assert code == 0, worker_logs[stopped].read_text()[-3000:]
        assert "handing the trial back" in worker_logs[stopped].read_text()

        deadline = time.monotonic() + PIPELINE_SECONDS
        for i, proc in enumerate(workers):
            code = proc.wait(max(1.0, deadline - time.monotonic()))
            assert code == 0, f"worker {i + 1} exited {code}:\n{worker_logs[i].read_text()[-3000:]}"
    finally:
        for proc in workers:
            stop_process(proc)

    # Every stage's budget is spent and nothing was lost: no trial left running or waiting.
    storage = open_storage(pg_url)
    pipe = pipeline.load(storage, STUDY)
    assert pipe.stages and [s.name for s in pipe.stages] == ["optimizer", "regularization"]
    handed_back = []
    for stage in pipe.stages:
        study = pipeline.load_stage_study(storage, STUDY, stage)
        counts = pipeline.counts(study)
        assert counts.finished == stage.trials, (stage.name, counts)
        assert counts.running == counts.waiting == 0, (stage.name, counts)
        trials = study.get_trials()
        for t in trials:
            if t.user_attrs.get("fail_reason") == "interrupted":
                (retry,) = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
                handed_back.append((t.params == retry.params, retry.state.name))
    # The stopped worker's trial was handed back and finished by another worker.
    assert handed_back == [(True, "COMPLETE")], handed_back
    # What `docker compose logs -f worker` shows: per-epoch progress of each trial.
    assert any(re.search(r"stage regularization trial \d+ epoch 2/2: val_acc", log.read_text())
               for log in worker_logs)

    # hpo (the tools profile): its default command is `status` of the study.
    status = compose.run("hpo", logs / "hpo-status.log")
    assert "optimizer" in status and "regularization" in status

    # dashboard: inside a container it listens on 0.0.0.0:8080 and compose publishes that port
    # on 127.0.0.1 only; here there is no container, so the process itself takes 127.0.0.1 (the
    # second deviation) and a free port.
    cmd, env = compose.command("dashboard")
    port = free_port()
    for flag, inside, here in (("--host", "0.0.0.0", "127.0.0.1"), ("--port", "8080", str(port))):
        assert cmd[cmd.index(flag) + 1] == inside
        cmd[cmd.index(flag) + 1] = here
    dashboard_log = logs / "dashboard.log"
    dashboard = compose.start(dashboard_log, cmd, env)
    try:
        names = _study_names(f"http://127.0.0.1:{port}", dashboard, dashboard_log)
        assert {f"{STUDY}/optimizer", f"{STUDY}/regularization"} <= names
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard/", timeout=10) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        stop_process(dashboard)


def _study_names(base: str, proc: subprocess.Popen, log: Path) -> set[str]:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as r:
                return {s["study_name"] for s in json.load(r)["study_summaries"]}
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"dashboard did not answer within {STARTUP_SECONDS}s:\n"
                         f"{log.read_text()[-3000:]}")
