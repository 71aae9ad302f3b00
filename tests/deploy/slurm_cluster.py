"""A one-node Slurm cluster in a temporary folder, from Debian's packages (slurmctld, slurmd,
munge), for tests: its own munge socket and key, its own ports, spool and state folders, no
cgroups (proctrack/linuxproc), and two fake GPUs (a GRES without device files) so that
`--gres=gpu:1` is requested and granted for real. Runs as root only: slurmd starts jobs as their
submitting user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import stop_process

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")
FAKE_GPU_FILES = ("/dev/null", "/dev/zero")
GPUS = len(FAKE_GPU_FILES)


def missing() -> str:
    """Why a cluster cannot start here, or "" when it can."""
    lacking = [b for b in BINARIES if shutil.which(b) is None
               and not Path("/usr/sbin", b).exists()]
    if lacking:
        return (f"Slurm is not installed ({', '.join(lacking)} missing): as root, apt-get install"
                " slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; run the test as root"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class Cluster:
    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        host = socket.gethostname()
        for sub in ("state", "spool", "munge", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = munge / "munge.socket"
        self._spawn([_exe("munged"), "--foreground", "--force", f"--key-file={key}",
                     f"--socket={sock}", f"--pid-file={munge / 'munged.pid'}",
                     f"--seed-file={munge / 'seed'}", f"--log-file={munge / 'munged.log'}"],
                    "munged")
        self._wait(sock.exists, "munged's socket", munge / "munged.log")
        cpus = os.cpu_count() or 1
        # Two "GPUs" backed by harmless device files: slurmd counts a gpu GRES by its files (one
        # without File is counted 0 and drains the node), and with task/none nothing is fenced.
        (self.root / "gres.conf").write_text(
            "AutoDetect=off\n" + "".join(f"Name=gpu File={f}\n" for f in FAKE_GPU_FILES))
        self.conf.write_text("\n".join([
            "ClusterName=hpotest",
            f"SlurmctldHost={host}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={sock}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # Time between scancel's SIGTERM and its SIGKILL: the hand-back must fit in it.
            "KillWait=30",
            "GresTypes=gpu",
            f"NodeName={host} CPUs={cpus} Gres=gpu:{GPUS} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._spawn([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([_exe("slurmd"), "-D", "-f", str(self.conf)], "slurmd")
        self._wait(self._node_idle, "the node to be idle", self.root / "log" / "slurmd.log")

    def _spawn(self, cmd: list[str], name: str) -> None:
        with (self.root / "log" / f"{name}.out").open("w") as out:
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                               env=self.env(), start_new_session=True))

    def _node_idle(self) -> bool:
        run = subprocess.run([_exe("sinfo"), "-h", "-o", "%t"], env=self.env(),
                             capture_output=True, text=True)
        return run.returncode == 0 and run.stdout.strip() == "idle"

    def _wait(self, ready: object, what: str, log: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():  # type: ignore[operator]
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                         for p in sorted((self.root / "log").glob("*")) if p.is_file())
        raise AssertionError(f"Slurm: no {what}:\n{logs}\n--- {log}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, grace=20)

    def run(self, *cmd: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_exe(cmd[0]), *cmd[1:]], env={**self.env(), **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=60)
