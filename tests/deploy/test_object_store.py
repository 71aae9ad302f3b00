"""Checkpoints in an S3 bucket instead of a shared folder, for real: moto's S3 server as a real
process on 127.0.0.1, workers in separate working folders that share no directory.

Worker A is SIGKILLed mid-trial; worker B resumes that trial from the checkpoint in the bucket,
then starts the distillation stage and is stopped with SIGTERM (a hand-back); worker C, with an
empty cache, resumes it, its teacher downloaded from the bucket. `hpo export` and the dashboard's
artifact download read from the bucket too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from search.db import pipeline
from search.db.storage import open_storage
from search.runtime.retry import reap
from tests.helpers import hpo, hpo_env, stop_process, wait_for, write_space

BUCKET = "hpo-test"
PREFIX = "runs/one"
STORE = f"s3://{BUCKET}/{PREFIX}"
SPACE = """
    dataset = "digits"
    [fixed]
    model = "resnet20"
    width = 0.25
    crop_pad = 1
    batch_size = 64
    checkpoint_seconds = 0
    [[stage]]
    name = "optimizer"
    trials = 1
    epochs = 8
    pruner = { startup_trials = 10, warmup_epochs = 10 }
    [stage.params]
    lr = { low = 0.05, high = 0.2, log = true }
    [[stage]]
    name = "distill"
    trials = 1
    epochs = 6
    teacher = "best:optimizer"
    pruner = { startup_trials = 10, warmup_epochs = 10 }
    [stage.fixed]
    kd_alpha = 0.5
    [stage.params]
    weight_decay = { low = 1e-5, high = 1e-3, log = true }
"""


def test_delete_keeps_the_bucket_only_when_asked(
    pg_url: str, tmp_path: Path, s3: dict[str, str]
) -> None:
    space = write_space(tmp_path / "s.toml", SPACE)
    for name in ("kept", "gone", "gone-not"):  # "gone-not" shares a prefix with "gone"
        made = hpo("create", "--space", str(space), "--study", name, url=pg_url, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        for n in range(3):
            _client(s3).put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/o/trial-{n}/best.pt",
                                   Body=b"x")
    kept = hpo("delete", "kept", "--yes", "--keep-objects", url=pg_url, cwd=tmp_path,
               HPO_ARTIFACTS=STORE, **s3)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert f"objects under {STORE}/kept in the bucket are kept" in kept.stdout
    gone = hpo("delete", "gone", "--yes", url=pg_url, cwd=tmp_path, HPO_ARTIFACTS=STORE, **s3)
    assert gone.returncode == 0, gone.stderr[-3000:]
    assert f"3 object(s) in {STORE}" in gone.stdout, gone.stdout
    assert {k.split("/")[0] for k in _keys(s3)} == {"kept", "gone-not"}
    names = {s.study_name for s in optuna.get_all_study_summaries(open_storage(pg_url))}
    assert {n.split("/")[0] for n in names} == {"gone-not"}, names
    # An unreachable bucket: one line, exit 2, nothing deleted.
    bad = hpo("delete", "gone-not", "--yes", url=pg_url, cwd=tmp_path,
              HPO_ARTIFACTS=f"s3://no-such-bucket-{os.getpid()}", **s3)
    assert bad.returncode == 2 and "is not reachable" in bad.stderr, bad.stderr
    assert pipeline.load(open_storage(pg_url), "gone-not").stages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server, and the AWS variables that point boto3 at it, with BUCKET created."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("moto's server is not installed: pip install -e '.[dev]'")
    port = _free_port()
    log = (tmp_path / "moto.log").open("w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        wait_for(lambda: _answers(port) or proc.poll() is not None, "moto_server", 60)
        assert proc.poll() is None, (tmp_path / "moto.log").read_text()
        _client(env).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        stop_process(proc)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _client(env: dict[str, str]) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test")


def _keys(env: dict[str, str]) -> set[str]:
    listed = _client(env).list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/")
    return {o["Key"][len(PREFIX) + 1:] for o in listed.get("Contents", [])}



def _worker(name: str, tmp: Path, url: str, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """A worker in a working folder of its own: its cache (./hpo-cache) is its own too."""
    cwd = tmp / name
    cwd.mkdir()
    log = cwd / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "worker", "--study", "s", "--device", "cpu",
             "--threads", "1", "--artifacts", STORE],
            cwd=cwd, env={**hpo_env(url, **env)}, stdout=out,
            stderr=subprocess.STDOUT)
    return proc, cwd


def _stage(url: str, name: str) -> optuna.Study:
    storage = open_storage(url)
    stage = next(s for s in pipeline.load(storage, "s").stages if s.name == name)
    return pipeline.load_stage_study(storage, "s", stage)


def _running_with_checkpoint(study: optuna.Study, env: dict[str, str], folder: str) -> bool:
    running = study.get_trials(states=(TrialState.RUNNING,))
    return bool(running) and len(running[0].intermediate_values) >= 1 \
        and f"{folder}/last.pt" in _keys(env)


def test_workers_that_share_no_folder_resume_and_distil_through_the_bucket(
    pg_url: str, tmp_path: Path, s3: dict[str, str]
) -> None:
    space = write_space(tmp_path / "s.toml", SPACE)
    made = hpo("create", "--space", str(space), "--study", "s", url=pg_url, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    optimizer, distill = _stage(pg_url, "optimizer"), _stage(pg_url, "distill")

    # A: SIGKILLed mid-trial, once its epoch checkpoint is in the bucket.
    a, a_dir = _worker("a", tmp_path, pg_url, s3)
    wait_for(lambda: _running_with_checkpoint(optimizer, s3, "s/optimizer/trial-00000"),
              "worker A's first checkpoint in the bucket")
    a.send_signal(signal.SIGKILL)
    a.wait(30)
    (killed,) = optimizer.get_trials(states=(TrialState.RUNNING,))
    # Its heartbeat goes stale; the reaper every live worker runs fails it and queues a retry.
    # Run here, it makes the retry the only trial B can take, whatever the machine's speed.
    wait_for(lambda: bool(optimizer._storage._get_stale_trial_ids(optimizer._study_id)),
              "the killed trial's heartbeat to go stale", 120)
    reap(optimizer, killed._trial_id)

    # B: takes the retry, resumes it from the bucket, then starts the distillation stage and is
    # stopped one epoch in: the hand-back writes that epoch and uploads it before B exits.
    b, b_dir = _worker("b", tmp_path, pg_url, s3)
    wait_for(lambda: any(len(t.intermediate_values) >= 1
                          for t in distill.get_trials(states=(TrialState.RUNNING,))),
              "worker B one epoch into the distillation stage")
    b.send_signal(signal.SIGTERM)
    assert b.wait(120) == 0, (b_dir / "worker.log").read_text()[-3000:]

    # C: an empty cache; resumes the handed-back distillation trial with the teacher from the
    # bucket, and finishes the pipeline.
    c, c_dir = _worker("c", tmp_path, pg_url, s3)
    assert c.wait(600) == 0, (c_dir / "worker.log").read_text()[-3000:]

    first = optimizer.get_trials()
    assert [t.state for t in first] == [TrialState.FAIL, TrialState.COMPLETE]
    retry = first[1]
    assert retry.user_attrs["retry_of"] == killed.number and retry.params == killed.params
    assert retry.user_attrs["worker"].startswith(f"{socket.gethostname()}:{b.pid}#")
    # Resumed from the bucket, not restarted: B never saw A's folder.
    assert min(retry.intermediate_values) >= 2 and max(retry.intermediate_values) == 8
    assert retry.user_attrs["checkpoint"] == f"{STORE}/s/optimizer/trial-00000/best.pt"

    second = distill.get_trials()
    assert [t.state for t in second] == [TrialState.FAIL, TrialState.COMPLETE]
    assert second[0].user_attrs["fail_reason"] == "interrupted"
    done = second[1]
    assert done.user_attrs["worker"].startswith(f"{socket.gethostname()}:{c.pid}#")
    assert min(done.intermediate_values) >= 2 and max(done.intermediate_values) == 6
    assert done.user_attrs["config"]["teacher"] == retry.user_attrs["checkpoint"]
    # C downloaded the teacher into its own cache; it trained nothing of the first stage.
    cache = c_dir / "hpo-cache" / BUCKET / PREFIX / "s"
    assert (cache / "optimizer" / "trial-00000" / "best.pt").is_file()
    assert not (cache / "optimizer" / "trial-00000" / "last.pt").exists()
    for folder in (a_dir, b_dir, c_dir):
        assert not (folder / "hpo-artifacts").exists()

    # What the bucket keeps: each configuration's best.pt and the dashboard's artifacts; last.pt
    # only while something may resume from it.
    keys = _keys(s3)
    assert {"s/optimizer/trial-00000/best.pt", "s/distill/trial-00000/best.pt"} <= keys
    assert not {k for k in keys if k.endswith("last.pt")}, keys
    assert done.user_attrs["checkpoint_artifact"] in {k.removeprefix("store/") for k in keys}

    # hpo export, in a fourth folder, reads the best checkpoint from the bucket.
    d_dir = tmp_path / "d"
    d_dir.mkdir()
    out = hpo("export", "s", "--out", str(d_dir / "best"), url=pg_url, cwd=d_dir,
              HPO_ARTIFACTS=STORE, **s3)
    assert out.returncode == 0, out.stderr[-3000:]
    exported = json.loads((d_dir / "best" / "config.json").read_text())
    best = max((retry, done), key=lambda t: t.value or 0.0)
    assert exported["trial"] == best.number and (d_dir / "best" / "best.pt").is_file()

    # The dashboard serves the checkpoint artifact straight from the bucket.
    port = _free_port()
    log = d_dir / "dashboard.log"
    with log.open("w") as f:
        dash = subprocess.Popen(
            [sys.executable, "-m", "search.cli", "dashboard", "--port", str(port)], cwd=d_dir,
            env={**hpo_env(pg_url, HPO_ARTIFACTS=STORE, **s3)},
            stdout=f, stderr=subprocess.STDOUT)
    try:
        artifact = done.user_attrs["checkpoint_artifact"]
        body = _fetch(f"http://127.0.0.1:{port}/artifacts/{distill._study_id}/{done._trial_id}/"
                      f"{artifact}", dash, log)
        stored = _client(s3).get_object(Bucket=BUCKET, Key=f"{PREFIX}/store/{artifact}")
        assert body == stored["Body"].read()
        assert body == (cache / "distill" / "trial-00000" / "best.pt").read_bytes()
    finally:
        dash.terminate()
        dash.wait(30)

    # hpo delete removes the study's objects from the bucket too: its checkpoints and the
    # Optuna artifacts its trials recorded; another study's objects stay.
    other = {f"{PREFIX}/s2/optimizer/trial-00000/best.pt", f"{PREFIX}/store/not-ours"}
    for key in other:
        _client(s3).put_object(Bucket=BUCKET, Key=key, Body=b"x")
    gone = hpo("delete", "s", "--yes", url=pg_url, cwd=d_dir, HPO_ARTIFACTS=STORE, **s3)
    assert gone.returncode == 0, gone.stderr[-3000:]
    assert f"{len(keys)} object(s) in {STORE}" in gone.stdout, gone.stdout
    assert _keys(s3) == {k.removeprefix(PREFIX + "/") for k in other}


def _fetch(address: str, proc: subprocess.Popen, log: Path) -> bytes:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(address, timeout=10) as r:
                return r.read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"dashboard did not answer:\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize(("spec", "says"), [
    ("ftp://host/x", "only folders and s3:// URLs"),
    ("s3://", "expected s3://bucket"),
    (f"s3://no-such-bucket-{os.getpid()}/p", "is not reachable"),
])
def test_a_bad_artifacts_url_is_one_line_and_exit_2(
    pg_url: str, tmp_path: Path, s3: dict[str, str], spec: str, says: str
) -> None:
    # Checked before the worker reads the database: no study needed.
    run = hpo("worker", "--study", "s", "--artifacts", spec, url=pg_url, cwd=tmp_path,
              **s3)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], run.stderr
    assert not (tmp_path / "hpo-cache").exists()
