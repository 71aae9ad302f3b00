"""Batched data augmentation and normalisation on the training device.

Pure functions of a uint8 NCHW batch: random pad-crop and horizontal flip are one gather with
per-image offsets (no loop over images, no PIL), jitter is per-image arithmetic. Randomness comes
only from the `generator` passed in, so a seeded generator reproduces a batch exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def resolve_pad(crop_pad: int, image_size: int) -> int:
    """`TrainConfig.crop_pad` in pixels: -1 means image_size // 8 (4 px at 32 px, 1 px at 8 px)."""
    return image_size // 8 if crop_pad < 0 else crop_pad


def mean_std_tensors(
    mean: Sequence[float], std: Sequence[float], device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (a dataset's, or a checkpoint's data facts) as float32 (C,)
    tensors on `device`, as `eval_transform` and `train_transform` take them."""
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


def eval_transform(x: Tensor, *, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 NCHW -> float32 NCHW, (x / 255 - mean) / std per channel; `x` is not changed."""
    return _normalise(x.float().div_(255), mean, std)


def train_transform(
    x: Tensor,
    *,
    pad: int,
    flip: bool,
    jitter: float,
    mean: Tensor,
    std: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Random crop of the zero-padded image, random flip, brightness/contrast jitter, normalise.

    `pad`: pixels of zero padding on each side before an HxW window is cut at a random offset
    (0 = no crop). `flip`: mirror each image left-right with probability 1/2. `jitter`: strength
    s of a brightness factor and a contrast factor, each uniform in [1 - s, 1 + s] per image
    (0 = off). `generator` lives on x's device; None uses the global RNG.
    """
    n, _, h, w = x.shape
    device = x.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))
        shift = torch.randint(0, 2 * pad + 1, (2, n, 1), device=device, generator=generator)
        rows = rows + shift[0]
        cols = cols + shift[1]
    if flip:
        flipped = torch.rand(n, 1, device=device, generator=generator) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    if pad > 0 or flip:
        # One gather for both: image i takes rows[i] x cols[i] of its (padded) self. Flat
        # offsets into each image's plane and a single `gather` are 3-6x faster than advanced
        # indexing with four index tensors.
        c, width = x.shape[1], x.shape[-1]
        index = (rows[:, :, None] * width + cols[:, None, :]).reshape(n, 1, h * w)
        x = x.reshape(n, c, -1).gather(2, index.expand(n, c, h * w)).view(n, c, h, w)
    out = x.float().div_(255)
    if jitter > 0:
        out = _jitter(out, jitter, generator)
    return _normalise(out, mean, std)


def _jitter(x: Tensor, strength: float, generator: torch.Generator | None) -> Tensor:
    n = x.shape[0]
    factors = torch.rand(2, n, 1, 1, 1, device=x.device, generator=generator)
    brightness, contrast = 1 + strength * (2 * factors - 1)
    x = x.mul_(brightness).clamp_(0, 1)
    # Contrast scales each image about its own mean level, so it changes spread, not brightness.
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    return x.sub_(grey).mul_(contrast).add_(grey).clamp_(0, 1)


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """In place: every caller passes a float tensor it has just made."""
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
