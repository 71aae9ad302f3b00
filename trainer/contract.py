"""What a caller outside the trainer needs to know of it, without importing torch.

A search worker imports this at start-up; torch costs it 300-800 MB and seconds, which a worker
that never trains (no GPU left to claim, a stub trainer in the load tests) should not pay. So
this module, `trainer.errors` and `trainer.config` import nothing that imports torch (a test in
tests/trainer/test_contract.py holds them to it). The callables that train (`trainer.train.train`)
are imported where they are called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from trainer.errors import (
    ConfigError,
    DataUnavailable,
    Diverged,
    Interrupted,
    NoFreeDevice,
    OutOfMemory,
    TrainError,
)

__all__ = [
    "BEST",
    "LAST",
    "METRIC_DIRECTIONS",
    "ConfigError",
    "DataUnavailable",
    "Direction",
    "Diverged",
    "Interrupted",
    "NoFreeDevice",
    "OutOfMemory",
    "Progress",
    "Report",
    "Result",
    "TrainError",
    "is_better",
    "stops_early",
]

# The files of a checkpoint_dir: `last.pt` is what a resumed run starts from, `best.pt` the
# weights of the best epoch (the model a trial produced). best.pt is always written first.
LAST = "last.pt"
BEST = "best.pt"
# The default largest test accuracy (a fraction) an int8 export may lose against fp32: the
# trainer's (trainer/quantize.py) and the CLI's `--max-accuracy-drop`.
MAX_DROP = 0.01

Direction = Literal["maximize", "minimize"]
# The per-epoch validation metrics a run records in its history (and may keep its best epoch
# by, `TrainConfig.best_metric`), each with the direction in which it is better.
METRIC_DIRECTIONS: dict[str, Direction] = {
    "val_acc": "maximize",
    "val_top5": "maximize",
    "val_loss": "minimize",
}

# report(epoch, metrics): called after each epoch (epochs count from 1); it may raise to end the
# run, and `Interrupted` first writes the epoch so the run resumes from it.
Report = Callable[[int, dict[str, Any]], None]
Progress = Callable[[int, int, int], None]  # (epoch, step in epoch, steps per epoch)


@dataclass
class Result:
    """What `trainer.train.train` returns: the best epoch's validation metrics (best by
    `TrainConfig.best_metric`), the test metrics of that epoch's weights (None with
    `TrainConfig.test` off, as in a search, which tests its winner alone), and the run's facts."""

    val_acc: float  # of the best epoch (the one whose weights are kept and tested)
    val_top5: float
    val_loss: float
    best_epoch: int
    test_acc: float | None
    test_top5: float | None
    test_loss: float | None
    test_macro_f1: float | None
    test_f1: list[float] | None
    confusion: list[list[int]] | None
    history: list[dict[str, Any]]  # one dict of metrics per epoch, resumed epochs included
    images_per_sec: float  # training throughput of the epochs this call ran
    peak_memory_mb: float
    device: str
    amp: str
    checkpoint: str  # best.pt, or "" without a checkpoint_dir
    data: dict[str, Any] = field(default_factory=dict)  # the recorded split
    # Seconds of the first step of a model compiled in this call (TrainConfig.compile), left out
    # of images_per_sec and the epochs' epoch_seconds; 0 when eager or compiled before.
    compile_seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    # The epoch after which early stopping (TrainConfig.early_stop_patience) ended training,
    # short of the configured epochs; None when the run trained every epoch.
    stopped_epoch: int | None = None

    def metrics(self) -> dict[str, Any]:
        return dict(self.__dict__)


def is_better(metric: str, value: float, than: float) -> bool:
    """Whether `value` of `metric` beats `than` strictly: a tie keeps the earlier epoch."""
    if METRIC_DIRECTIONS[metric] == "maximize":
        return value > than
    return value < than


def stops_early(patience: int, epoch: int, best_epoch: int, epochs: int,
                min_epochs: int = 0) -> bool:
    """Whether early stopping ends a run after `epoch` (counted from 1): it is on (`patience` >
    0), at least `min_epochs` epochs were trained (a run's first epochs are noisy, so a good run
    can look flat there), the last `patience` epochs did not beat the best one (`best_epoch`,
    the latest epoch that was better than every one before it), and epochs were left to train.
    A pure rule of the recorded history, so a resumed run counts on from its checkpoint."""
    return 0 < patience <= epoch - best_epoch and min_epochs <= epoch < epochs
