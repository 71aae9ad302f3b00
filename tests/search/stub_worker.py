"""A real `hpo worker` process whose trainer is a fast stub: for load tests, where what is under
test is the queue (Optuna, PostgreSQL, heartbeats), not the training. Everything but `train` is
the production code path.

    python -m tests.search.stub_worker worker --study S --device cpu ...

It never imports torch (the worker imports the trainer with its first real trial), so a load test
or benchmark can run dozens of these in a few GB.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from search import cli
from trainer.config import TrainConfig
from trainer.contract import BEST, Interrupted, Report, Result

EPOCH_SECONDS = float(os.environ.get("STUB_EPOCH_SECONDS", "0"))
# A configuration that kills its worker: the trial whose first attempt had this number (its
# checkpoint folder, trial-NNNNN) SIGKILLs the process at its first epoch, every attempt.
KILL_ROOT = os.environ.get("STUB_KILL_ROOT", "")


def stub_train(cfg: TrainConfig, report: Report, *, stop: threading.Event) -> Result:
    # A smooth, deterministic response surface: best near lr = 0.1.
    # A seed other than the default moves it a little, as seeds do: the confirmation stage's
    # re-runs differ (by 0.001 per seed), seed 0 keeps the surface of the other tests.
    acc = math.exp(-(math.log10(cfg.lr) + 1.0) ** 2) - 0.001 * cfg.seed
    history: list[dict[str, Any]] = []
    if KILL_ROOT and Path(cfg.checkpoint_dir).name == f"trial-{int(KILL_ROOT):05d}":
        os.kill(os.getpid(), signal.SIGKILL)
    for epoch in range(1, cfg.epochs + 1):
        time.sleep(EPOCH_SECONDS)
        if stop.is_set():
            raise Interrupted(epoch - 1)
        metrics = {"epoch": epoch, "val_acc": acc * epoch / cfg.epochs, "train_loss": 1.0 - acc,
                   "val_loss": 1.0 - acc, "val_top5": 1.0, "images_per_sec": 1.0}
        history.append(metrics)
        report(epoch, metrics)
    best = Path(cfg.checkpoint_dir) / BEST
    best.parent.mkdir(parents=True, exist_ok=True)
    # What `stub_test` reads back: the test accuracy of this "model".
    best.write_text(json.dumps({"test_acc": acc}))
    tested: dict[str, Any] = dict.fromkeys(("test_acc", "test_top5", "test_loss",
                                            "test_macro_f1", "test_f1", "confusion"))
    if cfg.test:  # as the trainer: the search turns it off
        tested = {"test_acc": acc, "test_top5": 1.0, "test_loss": 1.0 - acc,
                  "test_macro_f1": acc, "test_f1": [acc], "confusion": [[1]]}
    return Result(
        val_acc=acc, val_top5=1.0, val_loss=1.0 - acc, best_epoch=cfg.epochs, **tested,
        history=history, images_per_sec=1.0, peak_memory_mb=1.0, device="cpu", amp="off",
        checkpoint=str(best),
    )


def stub_test(path: Path, device: str) -> dict[str, Any]:
    """The winner's test metrics, as `trainer.export.evaluate_saved` returns them."""
    acc = float(json.loads(path.read_text())["test_acc"])
    return {"test_acc": acc, "test_top5": 1.0, "test_loss": 1.0 - acc, "test_macro_f1": acc,
            "checkpoint": str(path)}


if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:], train=stub_train, test=stub_test))
