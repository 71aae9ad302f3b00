"""`hpo run`: N worker processes on this machine, started, watched and stopped together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from search.runtime.worker import EXIT_ERRORS, EXIT_NO_DATA


def run_local(
    url: str, study: str, *, workers: int, device: str, artifacts: str | Path, threads: int,
    fault: str = "", log: Path | None = None,
    monitor: Callable[[Callable[[], bool]], None] | None = None,
) -> int:
    """Run `workers` worker processes to the end; 0 when all exited 0. Ctrl-C or SIGTERM is
    passed on to them, so each hands its trial back before exiting. With `log`, their output
    goes to that file; `monitor(alive)` runs meanwhile (the live view) until alive() is false."""
    if threads <= 0:
        # Workers share the cores: oversubscribed BLAS threads would slow every one of them.
        threads = max(1, (os.cpu_count() or 1) // workers)
    # HPO_STORAGE, not argv: the process list would show a password. A stop of `hpo run` is the
    # user's (Ctrl-C): its workers exit 0 then, whatever a fleet's HPO_STOPPED_EXIT_CODE says.
    env = {**os.environ, "HPO_STORAGE": url, "HPO_STOPPED_EXIT_CODE": "0"}
    cmd = [sys.executable, "-m", "search.cli", "worker", "--study", study,
           "--artifacts", str(artifacts), "--threads", str(threads)]
    if fault:
        cmd += ["--fault", fault]
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("a")
    procs = [subprocess.Popen([*cmd, "--device", d], env=env, stdout=out,
                              stderr=subprocess.STDOUT if out else None)
             for d in _devices(device, workers)]

    def forward(signum: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if monitor is not None:
            monitor(lambda: any(p.poll() is None for p in procs))
        codes = [p.wait() for p in procs]
    finally:
        if out is not None:
            out.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    for code in sorted(set(codes) - {0}):
        why = EXIT_MEANING.get(code, "crashed")
        print(f"hpo: {codes.count(code)} worker(s) exited {code}: {why} (see `hpo status`)",
              file=sys.stderr)
    return 0 if all(c == 0 for c in codes) else 1


EXIT_MEANING = {EXIT_ERRORS: "their trials kept raising errors",
                EXIT_NO_DATA: "they cannot read the data"}


def _devices(device: str, workers: int) -> list[str]:
    """One device per worker: `auto` spreads them over this machine's GPUs. torch is imported
    only to count GPUs, and only when the choice depends on it."""
    if device not in ("auto", "cuda"):
        return [device] * workers
    from trainer.device import local_devices

    return local_devices(device, workers)
