"""`hpo run`: N worker processes on this machine, started, watched and stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType


def run_local(
    url: str, study: str, *, workers: int, device: str, artifacts: str | Path, threads: int,
    fault: str = "",
) -> int:
    """Run `workers` worker processes to the end; 0 when all exited 0. Ctrl-C or SIGTERM is
    passed on to them, so each hands its trial back before exiting."""
    if threads <= 0:
        # Workers share the cores: oversubscribed BLAS threads would slow every one of them.
        threads = max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "HPO_STORAGE": url}  # not argv: the process list would show a password
    cmd = [sys.executable, "-m", "search.cli", "worker", "--study", study, "--device", device,
           "--artifacts", str(artifacts), "--threads", str(threads)]
    if fault:
        cmd += ["--fault", fault]
    procs = [subprocess.Popen(cmd, env=env) for _ in range(workers)]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if all(c == 0 for c in codes) else 1
