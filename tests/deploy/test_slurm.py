"""deploy/slurm for real: a one-node Slurm cluster (tests/deploy/slurm_cluster.py) runs
`deploy/slurm/submit.sh` (a create job, then the worker array, one task per fake GPU) with CPU
workers on a digits pipeline against PostgreSQL, to the end; `scancel` of one array task
mid-trial hands its trial back and the other task resumes it. A task nearing its time limit gets
worker.sbatch's early SIGTERM (`--signal=B:TERM@120`), hands its trial back and ends COMPLETED,
not TIMEOUT.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge: skipped with the reason
elsewhere, failed instead when CI=true (.ci/run installs them).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.db import pipeline
from search.db.storage import open_storage
from tests.deploy import read_env_file
from tests.deploy.slurm_cluster import GPUS, Cluster, missing
from tests.helpers import ROOT, tiny_space

STUDY = "slurm"
SUBMIT = ROOT / "deploy" / "slurm" / "submit.sh"
TIMEOUT = 600


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    why = missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, but {why}")
        pytest.skip(why)
    c = Cluster(tmp_path / "slurm")
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _wait_for(predicate: Callable[[], object], what: str, timeout: float = TIMEOUT) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _submit_folder(tmp: Path, pg_url: str, epochs: int = 6) -> Path:
    """A folder set up as README says: .env from .env.example with the user's edits, the
    password file where compose keeps it, the space file under ./spaces."""
    folder = tmp / "submit"
    (folder / "spaces").mkdir(parents=True)
    (folder / "docker" / "secrets").mkdir(parents=True)
    db = make_url(pg_url)
    (folder / "docker" / "secrets" / "db_password").write_text(
        (db.password or "unused-by-trust") + "\n")
    tiny_space(folder / "spaces" / "tiny.toml", trials1=3, trials2=2, epochs=epochs)
    dotenv = {
        **read_env_file(),
        "HPO_STUDY": STUDY, "HPO_SPACE": "tiny.toml", "HPO_SPACES_DIR": "./spaces",
        "HPO_DB_HOST": db.host or "127.0.0.1", "HPO_DB_PORT": str(db.port or 5432),
        "HPO_DB_NAME": str(db.database), "HPO_DB_USER": db.username or "postgres",
        # No GPU here, two shared cores: the only deviations from a GPU cluster.
        "HPO_DEVICE": "cpu", "HPO_THREADS": "1",
    }
    (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in dotenv.items()))
    return folder


def _stages(pg_url: str) -> list[optuna.Study]:
    storage = open_storage(pg_url)
    return [pipeline.load_stage_study(storage, STUDY, s)
            for s in pipeline.load(storage, STUDY).stages]


def _submit(cluster: Cluster, folder: Path, workers: int) -> str:
    """`submit.sh` as README says; returns the worker array's job id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    env.update(SLURM_CONF=str(cluster.conf), HPO_VENV=str(Path(sys.executable).parents[1]))
    # The node has two cores and no memory configured: the only sbatch options added here.
    sub = subprocess.run([str(SUBMIT), str(workers), "--cpus-per-task=1", "--mem=0"],
                         cwd=folder, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    return re.search(r"job array (\d+)", sub.stdout).group(1)  # type: ignore[union-attr]


def _wait_mid_trial(pg_url: str) -> optuna.trial.FrozenTrial:
    """A trial of the first stage at least one epoch in; call once the workers have started
    (the create job has made the study)."""
    first = _stages(pg_url)[0]

    def mid_trial() -> optuna.trial.FrozenTrial | None:
        running = [t for t in first.get_trials(states=(TrialState.RUNNING,))
                   if len(t.intermediate_values) >= 1]
        return running[0] if running else None

    found = mid_trial() or _wait_for(mid_trial, "a trial one epoch in")
    assert isinstance(found, optuna.trial.FrozenTrial)
    return found


def _worker_logs(folder: Path, array: str) -> dict[int, str]:
    """Each array task's log, by task id."""
    return {int(p.stem.rsplit("_", 1)[1]): p.read_text()
            for p in folder.glob(f"hpo-worker-{array}_*.log")}


def _wait_workers(folder: Path, array: str, tasks: int) -> None:
    _wait_for(lambda: len(logs := _worker_logs(folder, array)) == tasks
              and all("worker " in t for t in logs.values()),
              f"{tasks} array task(s) to start their workers")


def _job_field(cluster: Cluster, job: str, name: str) -> str:
    shown = cluster.run("scontrol", "show", "job", job)
    assert shown.returncode == 0, shown.stderr
    return re.search(rf"\b{name}=(\S+)", shown.stdout).group(1)  # type: ignore[union-attr]


def _seconds(run_time: str) -> int:
    """Slurm's [D-]HH:MM:SS."""
    days, _, clock = run_time.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86_400 + h * 3600 + m * 60 + s


def test_a_task_near_its_time_limit_hands_its_trial_back_and_ends_completed(
    cluster: Cluster, pg_url: str, tmp_path: Path
) -> None:
    """Trials far longer than the job may run. Once the task is mid-trial its time limit is cut
    to 2 minutes past the next whole minute of its run time: worker.sbatch's `--signal=B:TERM@120`
    is then due, slurmctld sends it at its next time-limit check, and hpo (the batch shell,
    exec'd) must hand the trial back and exit 0 before the limit: the job ends COMPLETED, with
    its trial failed "interrupted" and queued again for another worker to resume."""
    folder = _submit_folder(tmp_path, pg_url, epochs=100_000)
    array = _submit(cluster, folder, 1)
    task = f"{array}_0"
    _wait_workers(folder, array, 1)
    victim = _wait_mid_trial(pg_url)
    elapsed = _seconds(_job_field(cluster, task, "RunTime"))
    limit = math.ceil((elapsed + 1) / 60) + 2  # minutes: the signal due now, the limit >= 2 min on
    cut = cluster.run("scontrol", "update", f"JobId={task}", f"TimeLimit={limit}")
    assert cut.returncode == 0, cut.stderr

    _wait_for(lambda: cluster.run("squeue", "-h").stdout.strip() == "", "the queue to empty")
    assert _job_field(cluster, task, "JobState") == "COMPLETED"
    assert _job_field(cluster, task, "ExitCode") == "0:0"
    log = _worker_logs(folder, array)[0]
    assert "handing the trial back" in log, log[-3000:]
    trials = _stages(pg_url)[0].get_trials()
    handed = trials[victim.number]
    assert handed.state == TrialState.FAIL and handed.user_attrs["fail_reason"] == "interrupted"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.WAITING and retry.params == victim.params


def test_the_worker_array_runs_a_pipeline_to_the_end_and_survives_scancel(
    cluster: Cluster, pg_url: str, tmp_path: Path
) -> None:
    folder = _submit_folder(tmp_path, pg_url)
    array = _submit(cluster, folder, GPUS)

    # Both tasks run, each on its own "GPU" (--gres=gpu:1 granted, two on the node).
    _wait_workers(folder, array, GPUS)
    victim = _wait_mid_trial(pg_url)
    worker_id = int(victim.user_attrs["worker"].rsplit("#", 1)[1])
    (task,) = [t for t, text in _worker_logs(folder, array).items()
               if re.search(rf"worker {worker_id} on cpu", text)]
    cancel = cluster.run("scancel", f"{array}_{task}")
    assert cancel.returncode == 0, cancel.stderr

    # The pipeline runs to the end on the other task; then the queue is empty.
    _wait_for(lambda: cluster.run("squeue", "-h").stdout.strip() == "", "the queue to empty")
    texts = _worker_logs(folder, array)
    assert "handing the trial back" in texts[task], texts[task][-3000:]
    other = next(t for t in texts if t != task)
    assert "Traceback" not in texts[other], texts[other][-3000:]
    assert "created study" in next(folder.glob("hpo-create-*.log")).read_text()

    stages = _stages(pg_url)
    trials = stages[0].get_trials()
    handed = trials[victim.number]
    assert handed.state == TrialState.FAIL and handed.user_attrs["fail_reason"] == "interrupted"
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["worker"] != victim.user_attrs["worker"]
    assert min(retry.intermediate_values) >= 2, "resumed from the hand-back's checkpoint"
    storage = open_storage(pg_url)
    for stage, study in zip(pipeline.load(storage, STUDY).stages, stages, strict=True):
        counts = pipeline.counts(study)
        assert counts.finished >= stage.trials, (stage.name, counts)
        assert counts.running == counts.waiting == 0, (stage.name, counts)
    # Checkpoints went where .env's defaults put them: hpo-artifacts in the submit folder.
    assert (folder / "hpo-artifacts" / STUDY).is_dir()
