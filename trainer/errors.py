"""Typed failures of a training run, so a caller can tell a bad region from a broken run.

Torch-free and importing nothing of the trainer, so `trainer.config` and `trainer.contract` can
take their errors from here without a cycle.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field is unknown or holds a bad value; the message names the field."""


class TrainError(RuntimeError):
    """Base of the trainer's own failures."""


class Diverged(TrainError):
    """The loss became NaN or infinite. `epoch`, `step` (counted over the run, from 0) and
    `loss` are of the first such step. It is raised within `trainer.step.FINITE_CHECK_STEPS`
    steps of it (the host reads the loss that often, not at every step), and always before that
    epoch is evaluated, reported or checkpointed, or the run is stopped (Interrupted)."""

    def __init__(self, epoch: int, step: int, loss: float) -> None:
        super().__init__(f"loss is {loss} at epoch {epoch}, step {step}: training diverged")
        self.epoch, self.step, self.loss = epoch, step, loss


class OutOfMemory(TrainError):
    """Even a micro-batch of one image did not fit on the device."""

    def __init__(self, batch_size: int, detail: str) -> None:
        super().__init__(
            f"out of memory at batch size {batch_size}, even with micro-batches of 1: {detail}"
        )
        self.batch_size = batch_size


class Interrupted(TrainError):
    """Stopped on request (SIGTERM); `last_epoch` is the last epoch with a checkpoint (0: none)."""

    def __init__(self, last_epoch: int) -> None:
        super().__init__(f"interrupted; the last checkpoint is of epoch {last_epoch}")
        self.last_epoch = last_epoch


class DataUnavailable(ConfigError):
    """The dataset cannot be read on this machine: a folder that is not there (an unmounted
    share), no class folders or images in it, CIFAR's files missing. A user error for
    `python -m trainer`; for a worker, a reason to hand its trial back and stop, since another
    machine may read the data."""


class NoFreeDevice(ConfigError):
    """Every GPU is claimed by another worker on this host."""
