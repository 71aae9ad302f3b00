"""What the benchmarks share: the environment of the processes they start."""

from __future__ import annotations

import os


def child_env(**extra: str) -> dict[str, str]:
    """This environment without the caller's HPO_* and STUB_* settings (a benchmark sets the ones
    it means), with one torch thread per process (they share the machine's cores) and output
    unbuffered, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "STUB_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
