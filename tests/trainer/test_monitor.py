"""Early stopping and gradient monitoring, on scikit-learn's real digits: a run stops after
`early_stop_patience` epochs without a better one, keeps and tests the best epoch's weights, and
resumes counting where it left off; every epoch records the global gradient norm of its steps
(mean and max), of the accumulated and unscaled gradient, before clipping.

Tiny ResNets on one CPU thread, fp32, random crops off (as tests/trainer/test_train.py).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer import checkpoint
from trainer.augment import eval_transform, mean_std_tensors
from trainer.config import ConfigError, TrainConfig
from trainer.contract import is_better, stops_early
from trainer.data import load_data
from trainer.device import resolve_runtime
from trainer.errors import Interrupted
from trainer.evaluate import evaluate
from trainer.losses import hard_loss
from trainer.models import build_model
from trainer.optim import make_optimizer, set_lr
from trainer.saved_model import load_model
from trainer.step import StepRunner
from trainer.train import Result, train

FAST = TrainConfig(
    dataset="digits", model="resnet20", width=0.25, batch_size=32, lr=0.1, crop_pad=0,
    epochs=3, device="cpu", amp="off",
)  # fmt: skip
CPU = torch.device("cpu")
# A constant, high rate (no decay, no warm-up): validation accuracy climbs, then wanders, so a
# short patience ends the run well before its 12 epochs.
PLATEAU = replace(FAST, epochs=12, lr=0.4, lr_floor=1.0, warmup_epochs=0.0,
                  early_stop_patience=2, checkpoint_seconds=3600.0)


def curve(result: Result) -> list[tuple[Any, ...]]:
    """What the history computed, not timed."""
    return [(h["epoch"], h["train_loss"], h["val_loss"], h["val_acc"], h["grad_norm_mean"],
             h["grad_norm_max"]) for h in result.history]


def best_so_far(history: list[dict[str, Any]], metric: str) -> list[int]:
    """After each epoch, the epoch kept so far: the earliest of the best (a tie is no gain)."""
    out: list[int] = []
    for h in history:
        if not out or is_better(metric, h[metric], history[out[-1] - 1][metric]):
            out.append(h["epoch"])
        else:
            out.append(out[-1])
    return out


# --- early stopping --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Result:
    return train(replace(PLATEAU, checkpoint_dir=str(tmp_path_factory.mktemp("stopped"))))


def test_the_run_stops_after_patience_epochs_without_a_better_one(stopped: Result) -> None:
    history, patience = stopped.history, PLATEAU.early_stop_patience
    assert stopped.stopped_epoch is not None and stopped.stopped_epoch < PLATEAU.epochs, (
        "this config should plateau well before its last epoch", curve(stopped))
    # No epoch past the stop was trained, and the rule held from the recorded history: the last
    # `patience` epochs did not beat the best, and at every epoch before, fewer had not.
    assert [h["epoch"] for h in history] == list(range(1, stopped.stopped_epoch + 1))
    kept = best_so_far(history, PLATEAU.best_metric)
    assert stopped.stopped_epoch - kept[-1] == patience
    assert all(h["epoch"] - k < patience for h, k in zip(history[:-1], kept, strict=False))
    best_acc = history[kept[-1] - 1]["val_acc"]
    assert all(h["val_acc"] <= best_acc for h in history[-patience:])
    assert [h["early_stop"] for h in history] == [False] * (len(history) - 1) + [True]
    assert all(not stops_early(patience, h["epoch"], k, PLATEAU.epochs)
               for h, k in zip(history[:-1], kept, strict=False))


def test_a_stopped_run_keeps_and_tests_its_best_epoch(stopped: Result) -> None:
    # As at a normal end: the kept epoch is the best one, its weights are in best.pt and are
    # the ones the test split was evaluated with, and last.pt holds the stopped epoch.
    assert stopped.best_epoch == best_so_far(stopped.history, "val_acc")[-1]
    assert stopped.val_acc == stopped.history[stopped.best_epoch - 1]["val_acc"]
    saved = checkpoint.load(stopped.checkpoint)
    assert saved["epoch"] == stopped.best_epoch
    last = checkpoint.load(Path(stopped.checkpoint).parent / checkpoint.LAST)
    assert last["epoch"] == stopped.stopped_epoch and last["history"] == stopped.history
    assert stopped.test_acc is not None and stopped.confusion is not None
    model, _ = load_model(stopped.checkpoint, CPU)
    data = load_data(PLATEAU, CPU)
    mean, std = mean_std_tensors(data.mean, data.std, CPU)
    test = evaluate(model, data, "test", resolve_runtime("cpu", "off"), batch_size=512,
                    mean=mean, std=std)
    assert test["acc"] == stopped.test_acc and test["loss"] == stopped.test_loss


def test_early_stopping_changes_nothing_before_it_stops(stopped: Result) -> None:
    whole = train(replace(PLATEAU, early_stop_patience=0, epochs=stopped.stopped_epoch or 1))
    assert whole.stopped_epoch is None
    assert not any(h["early_stop"] for h in whole.history)
    assert curve(whole) == curve(stopped)


@pytest.mark.parametrize("after", ["inside the patience", "at the stop"])
def test_a_resumed_run_counts_its_patience_on(
    stopped: Result, tmp_path: Path, after: str
) -> None:
    """Interrupted one epoch into the patience, the resumed run stops after the epochs left of
    it; interrupted at the stopping epoch's report, it trains nothing more."""
    assert stopped.stopped_epoch is not None
    at = stopped.stopped_epoch - 1 if after == "inside the patience" else stopped.stopped_epoch
    config = replace(PLATEAU, checkpoint_dir=str(tmp_path))

    def hand_back(epoch: int, metrics: dict[str, Any]) -> None:
        if epoch == at:
            raise Interrupted(epoch)

    with pytest.raises(Interrupted):
        train(config, report=hand_back)
    reports: list[int] = []
    resumed = train(config, report=lambda epoch, _: reports.append(epoch))
    assert reports == list(range(at + 1, stopped.stopped_epoch + 1))
    assert resumed.stopped_epoch == stopped.stopped_epoch
    assert curve(resumed) == curve(stopped)
    assert (resumed.best_epoch, resumed.test_acc) == (stopped.best_epoch, stopped.test_acc)


def test_no_early_stop_before_min_epochs(stopped: Result) -> None:
    """With early_stop_min_epochs past the epoch the plain run stopped at, the run trains on:
    the same epochs up to there, then stops by the same rule at an epoch >= the minimum (or at
    its end)."""
    assert stopped.stopped_epoch is not None
    least = stopped.stopped_epoch + 2
    later = train(replace(PLATEAU, early_stop_min_epochs=least))
    assert curve(later)[:stopped.stopped_epoch] == curve(stopped)
    assert len(later.history) >= least
    assert not any(h["early_stop"] for h in later.history[:least - 1])
    kept = best_so_far(later.history, PLATEAU.best_metric)
    if later.stopped_epoch is None:
        assert len(later.history) == PLATEAU.epochs
    else:
        assert later.stopped_epoch >= least
        assert later.stopped_epoch - kept[-1] >= PLATEAU.early_stop_patience
    # The rule itself: the minimum only holds the stop back, it never adds one.
    assert not stops_early(2, 3, 1, 12, min_epochs=4)
    assert stops_early(2, 4, 1, 12, min_epochs=4) and stops_early(2, 3, 1, 12)
    assert not stops_early(0, 9, 1, 12, min_epochs=4)


@pytest.mark.parametrize("value", [-1, 1.5, True])
@pytest.mark.parametrize("field", ["early_stop_patience", "early_stop_min_epochs"])
def test_a_bad_patience_is_a_config_error(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        train(replace(FAST, **{field: value}))


# --- gradient norms --------------------------------------------------------------------------


def test_every_epoch_records_finite_gradient_norms() -> None:
    result = train(replace(FAST, epochs=2))
    assert result.stopped_epoch is None  # patience 0: off
    for h in result.history:
        mean, peak = h["grad_norm_mean"], h["grad_norm_max"]
        assert math.isfinite(mean) and math.isfinite(peak) and 0 < mean <= peak, h


def test_the_recorded_norm_is_taken_before_clipping() -> None:
    clip = 0.01
    clipped = train(replace(FAST, epochs=1, grad_clip=clip))
    free = train(replace(FAST, epochs=1))
    h = clipped.history[0]
    # After clipping no step's norm exceeds `clip`; recorded before it, every one did here.
    assert h["grad_norm_mean"] > 10 * clip and h["grad_norm_max"] >= h["grad_norm_mean"]
    assert curve(clipped) != curve(free)  # the clip did act on the steps


def _batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data(FAST, CPU)
    x, y = next(data.train_batches(n, torch.Generator().manual_seed(0)))
    mean, std = mean_std_tensors(data.mean, data.std, CPU)
    return eval_transform(x, mean=mean, std=std), y


def _runner(config: TrainConfig, scaler: torch.amp.GradScaler | None = None) -> StepRunner:
    torch.manual_seed(0)
    model = build_model(config, 10, 1)
    model.eval()  # BatchNorm by running statistics: micro-batches compute the batch's gradient
    optimizer = make_optimizer(model, config)
    set_lr(optimizer, 0.1)
    return StepRunner(config, resolve_runtime("cpu", "off"), model, optimizer,
                      scaler or torch.amp.GradScaler("cpu", enabled=False), None, None)


def _full_batch_norm(config: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> float:
    """The norm of the whole batch's gradient, by autograd alone."""
    torch.manual_seed(0)
    model = build_model(config, 10, 1).eval()
    hard_loss(model(x), y, label_smoothing=0.0, weight=None).backward()
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None])))


@pytest.mark.parametrize("case", ["one batch", "4 micro-batches", "fp16 loss scaling"])
def test_the_norm_is_of_the_step_gradient_unscaled(case: str) -> None:
    x, y = _batch()
    config = replace(FAST, accum_steps=4) if case == "4 micro-batches" else FAST
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if case == "fp16 loss scaling" \
        else None
    runner = _runner(config, scaler)
    runner.step(x, y, epoch=1, step=0)
    mean, peak = runner.take_grad_norms()
    expected = _full_batch_norm(FAST, x, y)
    assert mean == peak and mean == pytest.approx(expected, rel=1e-5)
    assert runner.take_grad_norms() == (None, None)  # read once, then a fresh start


def test_a_step_whose_gradient_overflowed_is_left_out() -> None:
    # A non-finite gradient under loss scaling (here a NaN loss at step 0, as fp16 overflows
    # give): GradScaler skips the step, and its norm is no measurement of the gradient.
    x, y = _batch()
    runner = _runner(replace(FAST, fault="nan@0"), torch.amp.GradScaler("cpu", init_scale=4.0))
    runner.step(x, y, epoch=1, step=0)
    assert runner.take_grad_norms() == (None, None)
    runner.step(x, y, epoch=1, step=1)  # skipped, so the weights are still finite
    mean, peak = runner.take_grad_norms()
    assert mean is not None and math.isfinite(mean) and mean == peak
    assert mean == pytest.approx(_full_batch_norm(FAST, x, y), rel=1e-5)
