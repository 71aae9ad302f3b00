"""Offline tasks where tuning matters, for benchmarks and smoke tests (`dataset = "digits-hard"`
or `"synthetic-hard"` in a space file). Plain digits cannot tell search methods apart: every
reasonable configuration reaches 97-98% and its 288 validation images move in steps of 0.35
points. These have headroom (a default configuration trails a tuned one by several points) and
at least 1,000 validation images at the default fractions. Both are built from fixed seeds:
the same images on every machine; only the train/val/test split follows `split_seed`.

- `digits-hard`: scikit-learn's 1,797 digits at 16x16, four copies of each under independent
  random affine distortions (rotation up to 25 degrees, scale 0.8-1.15, shear up to 0.3,
  shifts up to 2 px) and pixel noise: 7,188 images. The copies of one digit share a split
  group, so no distorted copy of a training digit is validated on.
- `synthetic-hard`: 8,000 16x16 RGB images of ten classes, each a sum of two oriented
  gratings whose frequencies and angles are drawn around the class's own with overlapping
  spreads, in random colours over textured noise; the overlap caps accuracy below 100%.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

HARD_SIZE = 16
DIGIT_COPIES = 4
SYNTHETIC_HARD_COUNT = 8000
_SEED = 20261201


def digits_hard() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(uint8 images (N, 1, 16, 16), labels, split groups)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    base = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)  # (n, 1, 8, 8) in 0..1
    base = F.interpolate(base, size=(HARD_SIZE, HARD_SIZE), mode="bilinear", align_corners=False)
    gen = torch.Generator().manual_seed(_SEED)
    n = len(base)
    images = base.repeat(DIGIT_COPIES, 1, 1, 1)
    count = len(images)
    angle = (torch.rand(count, generator=gen) * 2 - 1) * math.radians(25)
    scale = 0.8 + 0.35 * torch.rand(count, generator=gen)
    shear = (torch.rand(count, generator=gen) * 2 - 1) * 0.3
    shift = (torch.rand(count, 2, generator=gen) * 2 - 1) * (2 * 2 / HARD_SIZE)  # +-2 px
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos, -sin + shear, shift[:, 0]], dim=1),
        torch.stack([sin, cos, shift[:, 1]], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    warped += 0.12 * torch.randn(warped.shape, generator=gen)
    pixels = (warped.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = np.tile(bunch.target.astype(np.int64), DIGIT_COPIES)
    groups = np.tile(np.arange(n), DIGIT_COPIES)
    return pixels, labels, groups


def synthetic_hard() -> tuple[torch.Tensor, np.ndarray]:
    """(uint8 images (N, 3, 16, 16), labels)."""
    gen = torch.Generator().manual_seed(_SEED + 1)
    n, k, size = SYNTHETIC_HARD_COUNT, 10, HARD_SIZE
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=gen)]
    # Each class: two gratings with a characteristic frequency (cycles per image) and angle.
    class_freq = torch.tensor([[1.5, 3.0], [2.0, 3.5], [2.5, 1.5], [3.0, 2.0], [3.5, 2.5],
                               [1.5, 2.5], [2.0, 1.5], [2.5, 3.5], [3.0, 1.5], [3.5, 3.0]])
    class_angle = torch.linspace(0, math.pi, k + 1)[:k]
    freq = class_freq[labels] + 0.45 * torch.randn(n, 2, generator=gen)
    angle = class_angle[labels, None] + torch.tensor([0.0, math.pi / 2]) \
        + 0.35 * torch.randn(n, 2, generator=gen)
    phase = 2 * math.pi * torch.rand(n, 2, generator=gen)
    coords = torch.arange(size, dtype=torch.float) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    along = (torch.cos(angle)[:, :, None, None] * xx + torch.sin(angle)[:, :, None, None] * yy)
    waves = torch.cos(2 * math.pi * freq[:, :, None, None] * along + phase[:, :, None, None])
    pattern = waves.sum(dim=1) / 2  # (n, S, S) in -1..1
    colour = 0.3 + 0.4 * torch.rand(n, 3, generator=gen)
    images = colour[:, :, None, None] + 0.25 * pattern[:, None]
    images += 0.15 * torch.randn(images.shape, generator=gen)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels, labels.numpy().astype(np.int64)
