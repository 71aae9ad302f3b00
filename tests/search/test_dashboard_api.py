"""The stock optuna-dashboard reads what this service wrote: `hpo dashboard` as a real process on a
finished study, queried over HTTP through the same JSON API its web page uses."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import hpo, hpo_env

STARTUP_SECONDS = 60  # generous: two cores are shared with other test runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        assert response.status == 200
        body = response.read()
    return json.loads(body) if path.startswith("/api/") else body


@pytest.fixture(scope="module")
def dashboard(
    finished_study: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """`hpo dashboard done` serving the finished study; yields (base URL, port)."""
    url, cwd = finished_study
    port = _free_port()
    log = tmp_path_factory.mktemp("dashboard") / "dashboard.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "dashboard", "done", "--port", str(port),
             "--host", "127.0.0.1", "--artifacts", str(cwd / "artifacts")],
            cwd=cwd, env=hpo_env(url), stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dashboard exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _get(base, "/api/meta")
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    pytest.fail(f"dashboard did not answer within {STARTUP_SECONDS}s:\n"
                                f"{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _studies(base: str) -> dict[str, int]:
    return {s["study_name"]: s["study_id"] for s in _get(base, "/api/studies")["study_summaries"]}


def test_dashboard_lists_every_stage_study(dashboard: tuple[str, int]) -> None:
    base, _ = dashboard
    assert {"done/optimizer", "done/regularization"} <= set(_studies(base))
    assert _get(base, "/api/meta")["artifact_is_available"] is True


def test_dashboard_shows_trials_with_params_epochs_and_attrs(dashboard: tuple[str, int]) -> None:
    base, _ = dashboard
    study_id = _studies(base)["done/optimizer"]
    detail = _get(base, f"/api/studies/{study_id}")
    assert detail["name"] == "done/optimizer" and detail["directions"] == ["maximize"]
    assert detail["has_intermediate_values"] is True
    user_attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
    assert user_attrs["stage"] == "1/2: optimizer"

    complete = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert complete, detail["trials"]
    assert detail["best_trials"] and detail["best_trials"][0]["state"] == "Complete"
    for trial in complete:
        params = {p["name"]: p for p in trial["params"]}
        assert set(params) == {"lr", "momentum"}
        assert params["lr"]["distribution"]["type"] == "FloatDistribution"
        assert params["lr"]["distribution"]["log"] is True
        assert [v["step"] for v in trial["intermediate_values"]] == [1, 2]
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert {"config", "carried", "epochs", "metrics", "worker", "device"} <= set(attrs)
        # The dashboard cuts JSON attributes at 1024 characters: the config must fit to be read.
        config = json.loads(attrs["config"])
        assert config["lr"] == pytest.approx(float(params["lr"]["param_external_value"]))
        assert config["model"] == "resnet20"
        assert len(json.loads(attrs["epochs"])) == 2

    # The checkpoint uploaded as an Optuna artifact downloads through the dashboard, byte for
    # byte, because `hpo dashboard --artifacts` points at the workers' store.
    trial = complete[0]
    attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
    artifact = trial["artifacts"][0]
    assert artifact["artifact_id"] == attrs["checkpoint_artifact"]
    body = _get(base, f"/artifacts/{study_id}/{trial['trial_id']}/{artifact['artifact_id']}")
    assert body == Path(attrs["checkpoint"]).read_bytes()


def _reachable_here(address: str) -> bool:
    """Whether `address` reaches this machine: a listener on every interface answers on it."""
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen()
        try:
            with socket.create_connection((address, server.getsockname()[1]), timeout=2):
                return True
        except OSError:
            return False


def _other_local_addresses() -> list[str]:
    candidates = []
    # A UDP connect sends nothing; it only asks the kernel which interface address it would use.
    for target in ("192.0.2.1", "10.255.255.255", "8.8.8.8"):
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            candidates.append(s.getsockname()[0])
    with contextlib.suppress(OSError):
        candidates += [i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None,
                                                          socket.AF_INET)]
    candidates.append("127.0.0.2")  # Linux answers all of 127/8 on lo: wildcard binds show there
    unique = [a for a in dict.fromkeys(candidates) if a not in ("127.0.0.1", "0.0.0.0")]
    return [a for a in unique if _reachable_here(a)]


def test_dashboard_binds_loopback_only(dashboard: tuple[str, int]) -> None:
    base, port = dashboard
    others = _other_local_addresses()
    if not others:
        pytest.skip("this machine has no local address besides 127.0.0.1 to try the bind on")
    _get(base, "/api/meta")  # still up on 127.0.0.1
    for address in others:
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass


def test_dashboard_of_an_unknown_study_is_refused(finished_study: tuple[str, Path]) -> None:
    url, cwd = finished_study
    run = hpo("dashboard", "nosuchstudy", "--port", str(_free_port()), url=url, cwd=cwd,
              timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("hpo: error: no study named 'nosuchstudy'"), lines[0]
    assert "done" in lines[0]  # names the studies that do exist
    assert "optuna-dashboard on" not in run.stdout  # refused before serving
    assert not (cwd / "hpo-artifacts").exists()  # and before touching the disk
