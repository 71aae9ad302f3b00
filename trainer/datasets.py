"""Where images come from: each dataset read once into a `Source` (all images plus labels).

A `Source` holds every image of a dataset in one index space: uint8 NCHW tensors on the CPU for
data that is decoded at load (digits, CIFAR, synthetic, a small image folder), or file paths for an
image folder that will be streamed. For CIFAR the official test images come last, so a split is
only ever a set of indices into one `Source` (`split_indices`, recorded by `split_record`).
Batching lives in `trainer.data`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch import Tensor

from trainer.config import ConfigError, TrainConfig
from trainer.errors import DataUnavailable
from trainer.sources import FOLDER_SIZE, SYNTHETIC_SIZE, list_folder

# The extensions torchvision's ImageFolder accepts, so a tree that works there works here.
SPLITS = ("train", "val", "test")
SYNTHETIC_COUNT = 2048
SYNTHETIC_CLASSES = 10
_RESIZE_CHUNK = 1024  # images per interpolate call: bounds the float32 temporaries


@dataclass(frozen=True)
class Source:
    name: str  # cfg.dataset
    classes: list[str]
    in_channels: int
    image_size: int
    flip_safe: bool
    labels: np.ndarray  # int64, one per image
    images: Tensor | None  # uint8 (N, C, S, S) on the CPU, or None when streamed from `paths`
    paths: list[str] | None  # one file per image, for image folders
    official_test: int  # the last `official_test` images are the dataset's own test set
    # Images with equal group ids always land in the same split (copies of one original).
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def read_source(cfg: TrainConfig, decode: bool = True) -> Source:
    """Read `cfg.dataset`, resized to `cfg.image_size` when that is nonzero.

    An image folder is only listed when `decode` is False; its images are then decoded on demand
    with `decode_image`. Every problem a user can cause is a `ConfigError` naming the path.
    """
    if cfg.dataset == "digits":
        source = _digits()
    elif cfg.dataset in ("cifar10", "cifar100"):
        source = _cifar(cfg.dataset, cfg.data_root, cfg.download)
    elif cfg.dataset == "synthetic":
        source = _synthetic(cfg.image_size or SYNTHETIC_SIZE)
    elif cfg.dataset in ("digits-hard", "synthetic-hard"):
        source = _hard(cfg.dataset)
    elif cfg.dataset.startswith("imagefolder:"):
        return _folder(cfg.dataset.removeprefix("imagefolder:"), cfg.image_size, decode)
    else:
        raise ConfigError(f"dataset: unknown dataset {cfg.dataset!r}")
    if cfg.image_size and cfg.image_size != source.image_size:
        assert source.images is not None
        images = resize_images(source.images, cfg.image_size)
        source = dataclasses.replace(source, images=images, image_size=cfg.image_size)
    return source


def resize_images(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of uint8 NCHW images to size x size, antialiased when shrinking."""
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    shrink = size < images.shape[-1]
    for start in range(0, len(images), _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        chunk = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink
        )
        out[start : start + _RESIZE_CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _digits() -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of an 4x4 block; scale to the usual 0..255 byte range.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return Source(
        name="digits",
        classes=[str(c) for c in bunch.target_names],
        in_channels=1,
        image_size=8,
        flip_safe=False,  # a mirrored digit is another symbol (or none)
        labels=bunch.target.astype(np.int64),
        images=torch.from_numpy(pixels).unsqueeze(1).contiguous(),
        paths=None,
        official_test=0,
    )


def _cifar(name: str, root: str, download: bool) -> Source:
    from torchvision.datasets import CIFAR10, CIFAR100

    kind = CIFAR10 if name == "cifar10" else CIFAR100
    folder = os.path.join(root, kind.base_folder)
    try:
        train = kind(root=root, train=True, download=download)
        test = kind(root=root, train=False, download=download)
    except RuntimeError as error:  # torchvision's "not found or corrupted"
        hint = (
            "the download did not complete; delete it and retry"
            if download
            else "pass download=true (--download) to fetch it"
        )
        raise DataUnavailable(
            f"dataset {name}: {folder!r} is missing or incomplete; {hint}, or put"
            f" {kind.base_folder} in {root!r} ({error})"
        ) from error
    except OSError as error:  # the download itself failed (no network, no space)
        raise DataUnavailable(
            f"dataset {name}: downloading into {root!r} failed ({error}); put"
            f" {kind.base_folder} there by hand"
        ) from error
    images = np.concatenate([train.data, test.data])  # NHWC uint8
    labels = np.asarray(list(train.targets) + list(test.targets), dtype=np.int64)
    return Source(
        name=name,
        classes=list(train.classes),
        in_channels=3,
        image_size=32,
        flip_safe=True,
        labels=labels,
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        paths=None,
        official_test=len(test.targets),
    )


def _hard(name: str) -> Source:
    from trainer import hard_tasks

    groups = None
    if name == "digits-hard":
        images, labels, groups = hard_tasks.digits_hard()
        classes, channels, flip = [str(c) for c in range(10)], 1, False
    else:
        images, labels = hard_tasks.synthetic_hard()
        classes, channels, flip = [f"class{c}" for c in range(10)], 3, False
    return Source(name=name, classes=classes, in_channels=channels,
                  image_size=hard_tasks.HARD_SIZE, flip_safe=flip, labels=labels, images=images,
                  paths=None, official_test=0, groups=groups)


def _synthetic(size: int) -> Source:
    """Ten classes, each a colour plus a 2-D cosine pattern of its own frequencies, with noise.

    The phase is random per image, so a horizontal flip yields another image of the same class,
    and a small convolutional net separates the classes within a few epochs.
    """
    gen = torch.Generator().manual_seed(20240601)  # the data are fixed; only splits vary
    n, k = SYNTHETIC_COUNT, SYNTHETIC_CLASSES
    colours = 0.25 + 0.5 * torch.rand(k, 3, generator=gen)
    freqs = torch.tensor(
        [(fx, fy) for fx in (1, 2, 3) for fy in (1, 2, 3, 4)][:k], dtype=torch.float
    )
    labels = torch.arange(n) % k
    labels = labels[torch.randperm(n, generator=gen)]
    phase = 2 * torch.pi * torch.rand(n, 2, generator=gen)
    grid = torch.arange(size, dtype=torch.float) / size
    wave_x = torch.cos(2 * torch.pi * freqs[labels, 0, None] * grid + phase[:, 0, None])
    wave_y = torch.cos(2 * torch.pi * freqs[labels, 1, None] * grid + phase[:, 1, None])
    pattern = 0.2 * wave_y[:, :, None] * wave_x[:, None, :]  # (N, S, S)
    images = colours[labels][:, :, None, None] + pattern[:, None]
    images += 0.05 * torch.randn(n, 1, 1, 1, generator=gen)  # per-image brightness
    images += 0.08 * torch.randn(images.shape, generator=gen)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return Source(
        name="synthetic",
        classes=[f"class{c}" for c in range(k)],
        in_channels=3,
        image_size=size,
        flip_safe=True,
        labels=labels.numpy().astype(np.int64),
        images=pixels,
        paths=None,
        official_test=0,
    )


def _folder(root: str, image_size: int, decode: bool) -> Source:
    classes, paths, labels = list_folder(root)
    size = image_size or FOLDER_SIZE
    return Source(
        name=f"imagefolder:{root}",
        classes=classes,
        in_channels=3,
        image_size=size,
        flip_safe=True,
        labels=np.asarray(labels, dtype=np.int64),
        images=decode_all(paths, size) if decode else None,
        paths=paths,
        official_test=0,
    )


def decode_image(path: str, size: int) -> Tensor:
    """One file as uint8 (3, size, size): RGB, squashed to a square by a bilinear resize."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (size, size):
                # PIL widens the bilinear filter when shrinking, so this is antialiased.
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(rgb, dtype=np.uint8)
    except OSError as error:
        raise DataUnavailable(
            f"dataset imagefolder: cannot read image {path!r}: {error}") from error
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_all(paths: Sequence[str], size: int) -> Tensor:
    """Decode many files into one uint8 (N, 3, size, size) tensor; PIL releases the GIL."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def put(index: int) -> None:
        out[index] = decode_image(paths[index], size)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(put, range(len(paths))))
    return out


def split_indices(
    labels: np.ndarray,
    *,
    split_seed: int,
    val_fraction: float,
    test_fraction: float,
    official_test: int = 0,
    groups: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Sorted train/val/test indices: test carved first (or the trailing official test images),
    then val from the rest; stratified by label where every class allows it. With `groups`,
    whole groups are carved (every image of a group in one split)."""
    if groups is not None:
        ids, first = np.unique(groups, return_index=True)
        parts = split_indices(labels[first], split_seed=split_seed, val_fraction=val_fraction,
                              test_fraction=test_fraction)
        return {name: np.flatnonzero(np.isin(groups, ids[part])) for name, part in parts.items()}
    everything = np.arange(len(labels))
    if official_test:
        pool, test = everything[:-official_test], everything[-official_test:]
    else:
        pool, test = _carve(everything, labels, test_fraction, split_seed)
    train, val = _carve(pool, labels[pool], val_fraction, split_seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _carve(
    index: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if fraction == 0 or len(index) == 0:
        return index, index[:0]
    try:
        kept, carved = train_test_split(
            index, test_size=fraction, random_state=seed, stratify=labels
        )
    except ValueError:  # a class too small to be in both parts: split without stratifying
        try:
            kept, carved = train_test_split(index, test_size=fraction, random_state=seed)
        except ValueError as error:
            raise ConfigError(
                f"{len(index)} images cannot be split with a fraction of {fraction}: {error}"
            ) from error
    return kept, carved


def split_record(source: Source, splits: dict[str, np.ndarray], cfg: TrainConfig) -> dict:
    """What identifies the split, JSON-serialisable: equal `sha256` means the same split."""
    lists = json.dumps({s: splits[s].tolist() for s in SPLITS}, separators=(",", ":"))
    return {
        "dataset": cfg.dataset,
        "split_seed": cfg.split_seed,
        "val_fraction": cfg.val_fraction,
        "test_fraction": 0.0 if source.official_test else cfg.test_fraction,
        "test_source": "official" if source.official_test else "carved",
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "n_test": len(splits["test"]),
        "sha256": hashlib.sha256(lists.encode()).hexdigest()[:16],
    }
