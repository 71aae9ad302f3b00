"""Seeded, recorded splits of a dataset, served as uint8 NCHW batches on the training device.

`load_data(cfg, device)` returns an `ImageData`, cached so a persistent worker running many trials
loads each dataset once. Two implementations: `MemoryData` keeps every split as uint8 tensors on
the device and batches by on-device indexing (no per-image Python); `StreamData` decodes images
in persistent DataLoader workers, for image folders too large to hold decoded. Both shuffle with
the caller's generator the same way, so they yield the same batches for the same seed.
Augmentation and normalisation happen afterwards, batched on the device (`trainer.augment`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from trainer.config import ConfigError, TrainConfig
from trainer.datasets import (
    SPLITS,
    Source,
    decode_all,
    decode_image,
    read_source,
    split_indices,
    split_record,
)

STATS_SAMPLE = 2000  # images the streaming path reads to estimate mean and std
_CACHE_SIZE = 2
_STATS_CHUNK = 1024


class ImageData(ABC):
    """One dataset split into train/val/test, with what a training loop needs to know of it."""

    def __init__(
        self, source: Source, splits: dict[str, np.ndarray], record: dict, device: torch.device
    ) -> None:
        self.classes: list[str] = list(source.classes)
        self.num_classes: int = len(self.classes)
        self.in_channels: int = source.in_channels
        self.image_size: int = source.image_size
        self.flip_safe: bool = source.flip_safe
        self.n_train, self.n_val, self.n_test = (len(splits[s]) for s in SPLITS)
        self.record: dict[str, Any] = record
        self.device = device
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        counts = np.bincount(source.labels[splits["train"]], minlength=self.num_classes)
        self._class_counts = torch.from_numpy(counts.astype(np.int64)).to(device)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches `train_batches` yields: the last incomplete one is dropped, but never all."""
        return max(1, self.n_train // batch_size)

    def class_counts(self) -> Tensor:
        """Images of each class in the train split, int64 of shape (num_classes,) on the device."""
        return self._class_counts

    def _split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    @abstractmethod
    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled (uint8 NCHW images, int64 labels) batches on the device.

        The order is `torch.randperm(n_train, generator=generator)` (a CPU generator). Only full
        batches are yielded, except that a train split smaller than `batch_size` is one batch.
        """

    @abstractmethod
    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every image of `split` ("val", "test" or "train") in a fixed order, in batches."""


class MemoryData(ImageData):
    """Every split as uint8 tensors on the device; a batch is one `index_select`."""

    loader = "memory"

    def __init__(
        self, source: Source, splits: dict[str, np.ndarray], record: dict, device: torch.device
    ) -> None:
        super().__init__(source, splits, record, device)
        assert source.images is not None
        labels = torch.from_numpy(source.labels)
        self._x: dict[str, Tensor] = {}
        self._y: dict[str, Tensor] = {}
        for split in SPLITS:
            index = torch.from_numpy(splits[split])
            self._x[split] = source.images[index].to(device)
            self._y[split] = labels[index].to(device)
        train = self._x["train"]
        chunks = (train[i : i + _STATS_CHUNK] for i in range(0, len(train), _STATS_CHUNK))
        self.mean, self.std = channel_stats(chunks)

    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self._x["train"], self._y["train"]
        order = torch.randperm(self.n_train, generator=generator).to(self.device)
        for batch in _chunks(order, batch_size, drop_last=True):
            yield x.index_select(0, batch), y.index_select(0, batch)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        n = self._split_size(split)
        x, y = self._x[split], self._y[split]
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


class StreamData(ImageData):
    """Images decoded per batch by persistent DataLoader workers, then moved to the device.

    One DataLoader for training and one for evaluation, each keeping its workers across epochs;
    their batch samplers are refilled before every pass. Iterate one `train_batches` (and one
    `eval_batches`) at a time: starting a new pass resets the loader's workers.
    """

    loader = "stream"

    def __init__(
        self,
        source: Source,
        splits: dict[str, np.ndarray],
        record: dict,
        device: torch.device,
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__(source, splits, record, device)
        self._index = {s: torch.from_numpy(splits[s]) for s in SPLITS}
        items: Dataset = (
            _TensorItems(source.images, source.labels)
            if source.images is not None
            else _FileItems(source.paths or [], source.labels, source.image_size)
        )
        self._pin = device.type == "cuda"
        self._train_sampler, self._train_loader = self._loader(items, num_workers, seed)
        self._eval_sampler, self._eval_loader = self._loader(items, num_workers, seed)
        sample = np.random.default_rng(seed).permutation(splits["train"])[:STATS_SAMPLE]
        self._eval_sampler.batches = _chunks(torch.from_numpy(np.sort(sample)), 256, False)
        self.mean, self.std = channel_stats(x for x, _ in self._eval_loader)

    def _loader(self, items: Dataset, num_workers: int, seed: int) -> tuple[_Batches, DataLoader]:
        sampler = _Batches()
        loader = DataLoader(
            items,
            batch_sampler=sampler,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=self._pin,
            # The loader draws worker seeds from this; without it, it would draw from (and so
            # shift) the global RNG that model initialisation and augmentation may use.
            generator=torch.Generator().manual_seed(seed),
        )
        return sampler, loader

    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._index["train"][torch.randperm(self.n_train, generator=generator)]
        self._train_sampler.batches = _chunks(order, batch_size, drop_last=True)
        return self._to_device(self._train_loader)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        self._split_size(split)
        self._eval_sampler.batches = _chunks(self._index[split], batch_size, drop_last=False)
        return self._to_device(self._eval_loader)

    def _to_device(self, loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in loader:
            yield (
                x.to(self.device, non_blocking=self._pin),
                y.to(self.device, non_blocking=self._pin),
            )


class _Batches(Sampler[list[int]]):
    """A batch sampler whose batches the owner sets before each pass over the loader."""

    def __init__(self) -> None:
        self.batches: list[Tensor] = []

    def __iter__(self) -> Iterator[list[int]]:
        return (b.tolist() for b in list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


class _FileItems(Dataset):
    def __init__(self, paths: list[str], labels: np.ndarray, size: int) -> None:
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return decode_image(self.paths[index], self.size), int(self.labels[index])


class _TensorItems(Dataset):
    def __init__(self, images: Tensor, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def _chunks(order: Tensor, batch_size: int, drop_last: bool) -> list[Tensor]:
    """`order` cut into batches; with `drop_last`, a short order is still one batch."""
    if drop_last and len(order) >= batch_size:
        order = order[: len(order) - len(order) % batch_size]
    return list(torch.split(order, batch_size))


def channel_stats(batches: Iterable[Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NCHW batches, in [0, 1] pixel units."""
    total = total_sq = None
    count = 0
    for x in batches:
        x = x.to(torch.float64)
        s, sq = x.sum((0, 2, 3)), x.square().sum((0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += x.numel() // x.shape[1]
    assert total is not None and total_sq is not None, "no images to measure"
    mean = (total / count / 255).cpu()
    var = (total_sq / count / 255**2).cpu() - mean.square()
    # A constant channel would divide by zero; one grey level is the smallest meaningful spread.
    std = var.clamp_min(0).sqrt().clamp_min(1 / 255)
    return tuple(mean.tolist()), tuple(std.tolist())


_cache: OrderedDict[tuple, ImageData] = OrderedDict()
_cache_lock = threading.Lock()


def load_data(cfg: TrainConfig, device: torch.device) -> ImageData:
    """The dataset of `cfg`, split by `cfg.split_seed`, on `device`; cached (LRU of two)."""
    key = _cache_key(cfg, device)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        data = _load(cfg, device)
        _cache[key] = data
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return data


def clear_cache() -> None:
    """Forget every cached dataset (their memory and workers go once unreferenced)."""
    with _cache_lock:
        _cache.clear()


def _cache_key(cfg: TrainConfig, device: torch.device) -> tuple:
    dataset = cfg.dataset
    if dataset.startswith("imagefolder:"):
        dataset = "imagefolder:" + os.path.abspath(dataset.removeprefix("imagefolder:"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return (
        dataset, os.path.abspath(cfg.data_root), cfg.image_size, cfg.split_seed,
        cfg.val_fraction, cfg.test_fraction, cfg.loader, cfg.memory_limit_mb,
        cfg.num_workers, str(device),
    )  # fmt: skip


def _load(cfg: TrainConfig, device: torch.device) -> ImageData:
    source = read_source(cfg, decode=False)
    splits = split_indices(
        source.labels,
        split_seed=cfg.split_seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        official_test=source.official_test,
        groups=source.groups,
    )
    if len(splits["train"]) == 0:
        raise ConfigError(
            f"dataset {cfg.dataset}: {len(source)} images leave none for training after"
            f" test_fraction={cfg.test_fraction} and val_fraction={cfg.val_fraction}"
        )
    record = split_record(source, splits, cfg)
    if _wants_stream(cfg, source, len(splits["train"])):
        return StreamData(source, splits, record, device, cfg.num_workers, cfg.split_seed)
    if source.images is None:
        assert source.paths is not None
        source = dataclasses.replace(source, images=decode_all(source.paths, source.image_size))
    return MemoryData(source, splits, record, device)


def _wants_stream(cfg: TrainConfig, source: Source, n_train: int) -> bool:
    if cfg.loader != "auto":
        return cfg.loader == "stream"
    if source.images is not None:
        return False
    decoded = n_train * source.in_channels * source.image_size**2
    return decoded > cfg.memory_limit_mb * 2**20
