"""`bench/gpu_throughput.py --cpu-smoke`: the GPU benchmark's logic at tiny sizes on the CPU, in an
environment like the GPU machine's, where search/, Optuna, SQLAlchemy and psycopg2 cannot be
imported. Checks what it prints (every row, ratios beside a baseline), never how fast."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("optuna", "sqlalchemy", "psycopg2", "search")


def test_gpu_benchmark_smoke_run_prints_every_row(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    for name in BLOCKED:  # shadow each one: importing it fails as it would there
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_throughput.py"),
                          "--cpu-smoke"], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "CPU SMOKE RUN" in out
    assert re.search(r"bf16 matrix-multiply peak, torch.mm \d+x\d+: [\d.]+ TFLOP/s", out)
    ratio = r"\s+[\d.]+\s+[\d.]+x\s+[\d.]+\s+[\d.]+%\s+\d+"
    for model in ("resnet20 16x16", "resnet50 32x32"):
        section = out.split(model + ", batch", 1)[1].split("\n\n", 1)[0]
        assert re.search(r"baseline  DataLoader, \d+ workers" + ratio + r"\s+-\n", section)
        assert re.search(r"ours      trainer.train eager" + ratio + r"\s+-\n", section)
        assert re.search(r"ours      trainer.train compiled" + ratio + r"\s+[\d.]+$", section, re.M)
        assert re.search(r"baseline .*\s1\.00x", section)  # the baseline against itself
    for workers, cap in ((1, "1.000"), (2, "0.500")):
        assert re.search(rf"\n\s+{workers}\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+{cap}\s+\d+\n", out)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("summary (cpu smoke): resnet20 16x16: eager ")
    assert "2 worker(s)" in summary
