"""Contracts of `trainer.augment`: normalisation, pad-crop windows, flips, jitter, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.augment import eval_transform, mean_std_tensors, resolve_pad, train_transform
from trainer.config import TrainConfig
from trainer.data import clear_cache, load_data

UNIT = {"mean": torch.zeros(3), "std": torch.ones(3)}  # output * 255 is then the pixel value


def _distinct(n: int, side: int = 8) -> torch.Tensor:
    """n images whose 3 * side * side pixel values are all different within an image."""
    base = torch.arange(3 * side * side).reshape(3, side, side) + 1  # 1.., so 0 means padding
    return (base + torch.arange(n)[:, None, None, None]).remainder(256).to(torch.uint8)


def _pixels(y: torch.Tensor) -> torch.Tensor:
    return (y * 255).round().to(torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_eval_transform_of_a_constant_image() -> None:
    x = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 2.0])
    y = eval_transform(x, mean=mean, std=std)
    assert y.dtype == torch.float32 and y.shape == x.shape
    expected = (0.2 - mean) / std
    assert torch.allclose(y, expected[None, :, None, None].expand_as(y))
    assert int(x[0, 0, 0, 0]) == 51  # the input is left alone


def test_no_crop_no_flip_is_eval_transform() -> None:
    x = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.4])
    y = train_transform(x, pad=0, flip=False, jitter=0.0, mean=mean, std=std, generator=_gen(0))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(y, eval_transform(x, mean=mean, std=std))


def test_crop_cuts_a_window_of_the_padded_image() -> None:
    pad, side = 3, 8
    x = _distinct(256, side)
    y = _pixels(train_transform(x, pad=pad, flip=False, jitter=0.0, generator=_gen(1), **UNIT))
    assert y.shape == x.shape
    padded = F.pad(x, (pad,) * 4)
    offsets = set()
    for i in range(len(x)):
        windows = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(y[i], padded[i, :, dy : dy + side, dx : dx + side])
        ]
        assert len(windows) == 1, f"image {i} is not one window of its padded original"
        offsets.add(windows[0])
    assert len(offsets) > 25  # of the 49 possible shifts, many are used


def test_flip_mirrors_about_half() -> None:
    x = _distinct(1000)
    y = _pixels(train_transform(x, pad=0, flip=True, jitter=0.0, generator=_gen(2), **UNIT))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(3)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # each image is exactly one of the two
    assert 400 < int(mirrored.sum()) < 600


def test_same_generator_state_same_output() -> None:
    x = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    args = {"pad": 2, "flip": True, "jitter": 0.3, **UNIT}
    first = train_transform(x, generator=_gen(7), **args)
    assert torch.equal(first, train_transform(x, generator=_gen(7), **args))
    assert not torch.equal(first, train_transform(x, generator=_gen(8), **args))
    torch.manual_seed(3)
    global_rng = train_transform(x, generator=None, **args)
    torch.manual_seed(3)
    assert torch.equal(global_rng, train_transform(x, generator=None, **args))


def test_jitter_changes_brightness_and_contrast_per_image() -> None:
    x = torch.randint(64, 192, (200, 3, 8, 8), dtype=torch.uint8)
    plain = train_transform(x, pad=0, flip=False, jitter=0.0, generator=_gen(0), **UNIT)
    jittered = train_transform(x, pad=0, flip=False, jitter=0.5, generator=_gen(0), **UNIT)
    assert jittered.min() >= 0 and jittered.max() <= 1
    brightness = jittered.mean((1, 2, 3)) / plain.mean((1, 2, 3))
    spread = jittered.std((1, 2, 3)) / plain.std((1, 2, 3))
    assert brightness.min() < 0.8 and brightness.max() > 1.2
    assert spread.std() > 0.1  # factors differ from image to image
    weak = train_transform(x, pad=0, flip=False, jitter=0.05, generator=_gen(0), **UNIT)
    assert (weak - plain).abs().max() < (jittered - plain).abs().max()


def test_single_channel_and_large_batch() -> None:
    # Structural: 4096 images go through as whole-batch tensor operations.
    x = torch.randint(0, 256, (4096, 1, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    y = train_transform(x, pad=4, flip=True, jitter=0.2, mean=mean, std=std, generator=_gen(0))
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert y.min() >= (0 - 0.5) / 0.25 and y.max() <= (1 - 0.5) / 0.25


@pytest.mark.parametrize(("crop_pad", "image_size", "pad"), [(-1, 32, 4), (-1, 8, 1), (0, 32, 0)])
def test_resolve_pad(crop_pad: int, image_size: int, pad: int) -> None:
    assert resolve_pad(crop_pad, image_size) == pad


def test_mean_std_tensors_of_a_dataset() -> None:
    clear_cache()
    data = load_data(TrainConfig(dataset="digits"), torch.device("cpu"))
    mean, std = mean_std_tensors(data.mean, data.std, torch.device("cpu"))
    assert mean.shape == std.shape == (1,) and mean.dtype == torch.float32
    x, _ = next(data.eval_batches("train", 10**6))
    assert abs(float(eval_transform(x, mean=mean, std=std).mean())) < 1e-4
    clear_cache()
