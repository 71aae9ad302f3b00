"""Contracts of `trainer.schedule`: linear warm-up from 0, cosine decay to the floor, linear
batch scaling of the peak; all pure functions of the step."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.schedule import lr_at, peak_lr

PEAK, FLOOR = 0.4, 0.004


def lr(step: int, *, total: int = 1000, warmup: int = 100, floor: float = FLOOR) -> float:
    return lr_at(step, total_steps=total, warmup_steps=warmup, peak=PEAK, floor=floor)


def test_warmup_starts_at_zero_and_reaches_the_peak_at_its_end() -> None:
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(PEAK / 2)
    assert lr(100) == pytest.approx(PEAK)


def test_warmup_is_strictly_increasing() -> None:
    rates = [lr(s) for s in range(101)]
    assert all(a < b for a, b in itertools.pairwise(rates))


def test_decay_is_monotone_and_ends_at_the_floor() -> None:
    rates = [lr(s) for s in range(100, 1001)]
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert lr(1000) == pytest.approx(FLOOR)
    assert lr(5000) == pytest.approx(FLOOR)  # past the end the rate stays at the floor


def test_cosine_midpoint_is_halfway_between_peak_and_floor() -> None:
    # Warm-up 100 and total 1000 leave 900 decay steps; their midpoint is step 550.
    assert lr(550) == pytest.approx((PEAK + FLOOR) / 2)
    # A quarter of the way: cos(pi / 4) of the way down.
    quarter = FLOOR + (PEAK - FLOOR) * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr(325) == pytest.approx(quarter)


def test_without_warmup_the_first_step_gets_the_peak() -> None:
    assert lr(0, warmup=0) == PEAK
    assert lr(500, warmup=0, floor=0.0) == pytest.approx(PEAK / 2)


def test_warmup_longer_than_the_run_never_divides_by_zero() -> None:
    assert lr(9, total=10, warmup=20) == pytest.approx(PEAK * 9 / 20)


@settings(deadline=None)  # a shared machine stalls; timing is not the contract
@given(
    step=st.integers(0, 10_000),
    total=st.integers(1, 5_000),
    warmup=st.integers(0, 5_000),
    floor=st.floats(0.0, 1.0),
)
def test_rate_stays_between_zero_and_the_peak(
    step: int, total: int, warmup: int, floor: float
) -> None:
    rate = lr_at(step, total_steps=total, warmup_steps=warmup, peak=PEAK, floor=floor * PEAK)
    assert 0.0 <= rate <= PEAK * (1 + 1e-12)


@pytest.mark.parametrize(
    ("lr_value", "batch", "per_256", "expected"),
    [
        (0.1, 128, True, 0.05),
        (0.1, 256, True, 0.1),
        (0.1, 1024, True, 0.4),
        (0.1, 1024, False, 0.1),
        (0.1, 32, False, 0.1),
    ],
)
def test_peak_scales_linearly_with_the_batch_only_per_256(
    lr_value: float, batch: int, per_256: bool, expected: float
) -> None:
    assert peak_lr(lr_value, batch, per_256) == pytest.approx(expected)
    peak = peak_lr(lr_value, batch, per_256)
    assert lr_at(10, total_steps=100, warmup_steps=10, peak=peak, floor=0.0) == pytest.approx(
        expected
    )
