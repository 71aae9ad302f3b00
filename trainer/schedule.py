"""The learning-rate schedule as a pure function of the optimizer step."""

from __future__ import annotations

import math


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to `floor`.

    `step` counts optimizer steps from 0; step `total_steps` (one past the last) gives `floor`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def peak_lr(lr: float, batch_size: int, per_256: bool) -> float:
    """`lr` as given, or scaled linearly with the batch when it is stated per 256 images."""
    return lr * batch_size / 256 if per_256 else lr
