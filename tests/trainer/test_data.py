"""Contracts of `trainer.data`: seeded recorded splits, cached loading, batches, every dataset kind.

Real data throughout: scikit-learn's digits, PNG trees and a CIFAR-10 in torchvision's on-disk
format written to tmp_path, and the synthetic set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import ConfigError, TrainConfig
from trainer.data import ImageData, clear_cache, load_data
from trainer.datasets import read_source, split_indices

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    # Each test starts from an empty cache, and streaming workers do not outlive their test.
    clear_cache()
    yield
    clear_cache()


def _cat(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches, strict=True)
    return torch.cat(xs), torch.cat(ys)


def _epoch(data: ImageData, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(data.train_batches(batch_size, torch.Generator().manual_seed(seed)))


# --- digits ------------------------------------------------------------------------------------


def test_digits_shapes_sizes_and_splits() -> None:
    cfg = TrainConfig(dataset="digits", val_fraction=0.2, test_fraction=0.25)
    data = load_data(cfg, CPU)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 8)
    assert data.classes == [str(d) for d in range(10)]
    assert data.flip_safe is False
    n_test = math.ceil(0.25 * 1797)
    n_val = math.ceil(0.2 * (1797 - n_test))
    assert (data.n_test, data.n_val, data.n_train) == (n_test, n_val, 1797 - n_test - n_val)

    source = read_source(cfg)
    splits = split_indices(source.labels, split_seed=0, val_fraction=0.2, test_fraction=0.25)
    everything = np.concatenate([splits["train"], splits["val"], splits["test"]])
    assert len(everything) == len(np.unique(everything)) == 1797  # disjoint and covering
    for split in ("train", "val", "test"):
        x, y = _cat(data.eval_batches(split, 100))
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.device == CPU and x.shape[1:] == (1, 8, 8)
        # The loaded split is exactly these indices of the dataset, in index order.
        assert torch.equal(x, source.images[splits[split]])
        assert torch.equal(y, torch.from_numpy(source.labels[splits[split]]))
        # Stratified: every class keeps its share (digits has ~10% of each).
        assert (torch.bincount(y, minlength=10).float() / len(y)).min() > 0.08
    assert int(x.max()) > 200  # 0..16 scaled to bytes


def test_digits_record_depends_on_split_seed_only() -> None:
    base = TrainConfig(dataset="digits")
    data = load_data(base, CPU)
    json.dumps(data.record)
    assert data.record["n_train"] == data.n_train and data.record["split_seed"] == 0
    # A different training seed (or any non-data field) is the same cached object.
    assert load_data(dataclasses.replace(base, seed=7, lr=0.3), CPU) is data
    other = load_data(dataclasses.replace(base, split_seed=1), CPU)
    assert other.record["sha256"] != data.record["sha256"]
    clear_cache()
    again = load_data(base, CPU)
    assert again is not data and again.record == data.record


def test_cache_holds_two_datasets() -> None:
    first = load_data(TrainConfig(split_seed=1), CPU)
    second = load_data(TrainConfig(split_seed=2), CPU)
    assert load_data(TrainConfig(split_seed=1), CPU) is first  # now the most recent
    load_data(TrainConfig(split_seed=3), CPU)  # evicts split_seed=2
    assert load_data(TrainConfig(split_seed=1), CPU) is first
    assert load_data(TrainConfig(split_seed=2), CPU) is not second


def test_train_batches_seeded_full_and_complete() -> None:
    data = load_data(TrainConfig(dataset="digits"), CPU)
    epoch = _epoch(data, 100, seed=5)
    assert len(epoch) == data.steps_per_epoch(100) == data.n_train // 100
    assert all(x.shape == (100, 1, 8, 8) and y.shape == (100,) for x, y in epoch)
    assert all(x.dtype == torch.uint8 and y.dtype == torch.int64 for x, y in epoch)
    again = _epoch(data, 100, seed=5)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(epoch, again, strict=True)
    )
    assert not torch.equal(epoch[0][1], _epoch(data, 100, seed=6)[0][1])
    # With a batch size that divides nothing away, an epoch is the train split reordered.
    (x_all, y_all), (x_train, y_train) = (
        _cat(_epoch(data, 1, 0)),
        _cat(data.eval_batches("train", 64)),
    )
    assert torch.equal(torch.bincount(y_all, minlength=10), data.class_counts())
    assert torch.equal(
        x_all.flatten(1).sum(1).sort().values, x_train.flatten(1).sum(1).sort().values
    )
    assert int(data.class_counts().sum()) == data.n_train
    assert torch.equal(data.class_counts(), torch.bincount(y_train, minlength=10))


def test_small_train_split_is_one_batch() -> None:
    data = load_data(TrainConfig(dataset="digits"), CPU)
    ((_, y),) = _epoch(data, 10 * data.n_train, seed=0)
    assert len(y) == data.n_train and data.steps_per_epoch(10 * data.n_train) == 1


def test_eval_batches_fixed_order_and_bad_split() -> None:
    data = load_data(TrainConfig(dataset="digits"), CPU)
    batches = list(data.eval_batches("val", 100))
    assert [len(y) for _, y in batches] == [100, 100, data.n_val - 200]
    assert torch.equal(_cat(batches)[0], _cat(data.eval_batches("val", 7))[0])
    with pytest.raises(ValueError, match="split"):
        next(iter(data.eval_batches("holdout", 10)))


def test_mean_std_are_of_the_train_split() -> None:
    data = load_data(TrainConfig(dataset="digits"), CPU)
    x, _ = _cat(data.eval_batches("train", 512))
    pixels = x.double() / 255
    assert data.mean == pytest.approx((pixels.mean().item(),), rel=1e-9)
    assert data.std == pytest.approx((pixels.std(unbiased=False).item(),), rel=1e-9)


def test_resize_at_load() -> None:
    data = load_data(TrainConfig(dataset="digits", image_size=16), CPU)
    x, _ = next(data.eval_batches("test", 32))
    assert data.image_size == 16 and x.shape == (32, 1, 16, 16) and x.dtype == torch.uint8


# --- synthetic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [0, 16])
def test_synthetic_shapes_and_determinism(image_size: int) -> None:
    cfg = TrainConfig(dataset="synthetic", image_size=image_size)
    data = load_data(cfg, CPU)
    side = image_size or 32
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, side)
    assert data.n_train + data.n_val + data.n_test == 2048 and data.flip_safe
    first = _cat(data.eval_batches("val", 256))
    assert first[0].shape[1:] == (3, side, side)
    clear_cache()
    again = load_data(cfg, CPU)
    assert again.record == data.record and again.mean == data.mean
    assert all(
        torch.equal(a, b) for a, b in zip(first, _cat(again.eval_batches("val", 256)), strict=True)
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_over_in_memory_data_matches_memory(num_workers: int) -> None:
    memory = load_data(TrainConfig(dataset="synthetic", loader="memory"), CPU)
    stream = load_data(
        TrainConfig(dataset="synthetic", loader="stream", num_workers=num_workers), CPU
    )
    assert (memory.loader, stream.loader) == ("memory", "stream")
    assert stream.record == memory.record
    assert stream.mean == pytest.approx(memory.mean, abs=0.01)
    for (xm, ym), (xs, ys) in zip(_epoch(memory, 256, 3), _epoch(stream, 256, 3), strict=True):
        assert torch.equal(xm, xs) and torch.equal(ym, ys)
    assert torch.equal(
        _cat(memory.eval_batches("test", 99))[0], _cat(stream.eval_batches("test", 99))[0]
    )


# --- image folders ------------------------------------------------------------------------------

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def _write_folder(root: Path, per_class: int = 12) -> Path:
    for name, colour in COLOURS.items():
        folder = root / name / ("nested" if name == "emu" else "")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (10 + 3 * i, 24 - i)  # every image a different shape
            Image.new("RGB", size, colour).save(folder / f"{i:02d}.png")
        (folder / "notes.txt").write_text("not an image")
    (root / "empty-file.png").write_bytes(b"")  # top-level files are not classes
    return root


def test_imagefolder_memory(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "pets")
    data = load_data(TrainConfig(dataset=f"imagefolder:{root}", image_size=16), CPU)
    assert data.loader == "memory" and data.classes == ["cat", "dog", "emu"]
    assert (data.in_channels, data.image_size, data.flip_safe) == (3, 16, True)
    assert data.n_train + data.n_val + data.n_test == 36
    assert data.n_test == math.ceil(0.2 * 36)
    assert torch.equal(data.class_counts(), torch.bincount(_cat(data.eval_batches("train", 5))[1]))
    for split in ("train", "val", "test"):
        x, y = _cat(data.eval_batches(split, 5))
        assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.uint8
        colours = torch.tensor(
            [COLOURS[data.classes[int(label)]] for label in y], dtype=torch.uint8
        )
        # Solid colours survive decoding and resizing exactly.
        assert torch.equal(x, colours[:, :, None, None].expand_as(x))


def test_imagefolder_default_size(tmp_path: Path) -> None:
    data = load_data(TrainConfig(dataset=f"imagefolder:{_write_folder(tmp_path, 4)}"), CPU)
    assert data.image_size == 64 and next(data.eval_batches("val", 4))[0].shape[-2:] == (64, 64)


@pytest.mark.parametrize(
    ("loader", "num_workers", "memory_limit_mb"),
    [("stream", 0, 4096), ("stream", 2, 4096), ("auto", 0, 0)],
)
def test_imagefolder_stream_matches_memory(
    tmp_path: Path, loader: str, num_workers: int, memory_limit_mb: int
) -> None:
    root = _write_folder(tmp_path)
    cfg = TrainConfig(dataset=f"imagefolder:{root}", image_size=12, num_workers=num_workers)
    memory = load_data(cfg, CPU)
    stream = load_data(
        dataclasses.replace(cfg, loader=loader, memory_limit_mb=memory_limit_mb), CPU
    )
    assert stream.loader == "stream" and stream.record == memory.record
    assert stream.mean == pytest.approx(memory.mean) and stream.std == pytest.approx(memory.std)
    assert torch.equal(stream.class_counts(), memory.class_counts())
    for epoch_seed in (0, 1):  # twice: the persistent workers serve a second epoch
        pairs = zip(_epoch(memory, 8, epoch_seed), _epoch(stream, 8, epoch_seed), strict=True)
        for (xm, ym), (xs, ys) in pairs:
            assert xs.shape == (8, 3, 12, 12) and xs.dtype == torch.uint8
            assert torch.equal(xm, xs) and torch.equal(ym, ys)
    for split in ("val", "test"):
        xm, ym = _cat(memory.eval_batches(split, 5))
        xs, ys = _cat(stream.eval_batches(split, 5))
        assert torch.equal(xm, xs) and torch.equal(ym, ys)


def test_imagefolder_auto_keeps_small_data_in_memory(tmp_path: Path) -> None:
    cfg = TrainConfig(dataset=f"imagefolder:{_write_folder(tmp_path, 4)}", memory_limit_mb=1)
    assert load_data(cfg, CPU).loader == "memory"


@pytest.mark.parametrize("layout", ["missing", "no-classes", "empty-class", "broken-image"])
def test_imagefolder_errors_name_the_path(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "tree"
    if layout == "no-classes":
        root.mkdir()
        (root / "lonely.png").write_bytes(b"")
    elif layout == "empty-class":
        _write_folder(root, 2)
        (root / "yak").mkdir()
    elif layout == "broken-image":
        _write_folder(root, 2)
        (root / "cat" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=re.escape(str(root))):
        load_data(TrainConfig(dataset=f"imagefolder:{root}", loader="memory"), CPU)


# --- CIFAR --------------------------------------------------------------------------------------


def _pixels(n: int, start: int) -> np.ndarray:
    rng = np.random.default_rng(start)
    return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def _write_cifar10(root: Path, per_batch: int = 6, n_test: int = 10) -> np.ndarray:
    """A tiny CIFAR-10 in torchvision's layout; returns the test images as NCHW."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        batch = {"data": _pixels(per_batch, b), "labels": [i % 10 for i in range(per_batch)]}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch))
    test = {"data": _pixels(n_test, 99), "labels": [(3 * i) % 10 for i in range(n_test)]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    names = [f"name{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return test["data"].reshape(-1, 3, 32, 32)


@pytest.fixture
def _fake_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    # torchvision checks every CIFAR file against the real archive's md5; our tiny stand-ins
    # cannot match, so the check is reduced to "the file exists". Only that check is replaced.
    monkeypatch.setattr(
        "torchvision.datasets.cifar.check_integrity",
        lambda fpath, md5=None: os.path.isfile(fpath),
    )


@pytest.mark.usefixtures("_fake_md5")
@pytest.mark.parametrize("image_size", [0, 16])
def test_cifar10_official_test_split(tmp_path: Path, image_size: int) -> None:
    test_images = _write_cifar10(tmp_path)
    cfg = TrainConfig(dataset="cifar10", data_root=str(tmp_path), image_size=image_size)
    data = load_data(cfg, CPU)
    side = image_size or 32
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, side)
    assert data.classes[3] == "name3" and data.flip_safe
    assert (data.n_train, data.n_val, data.n_test) == (30 - 6, 6, 10)
    assert data.record["test_source"] == "official"
    x, y = _cat(data.eval_batches("test", 4))
    assert x.shape == (10, 3, side, side) and y.tolist() == [(3 * i) % 10 for i in range(10)]
    if not image_size:
        assert torch.equal(x, torch.from_numpy(test_images))
    train_x, _ = _cat(data.eval_batches("train", 8))
    assert not any(torch.equal(t, img) for t in x for img in train_x)


@pytest.mark.parametrize(
    ("dataset", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_missing_without_download(tmp_path: Path, dataset: str, folder: str) -> None:
    with pytest.raises(ConfigError, match="download") as error:
        load_data(TrainConfig(dataset=dataset, data_root=str(tmp_path)), CPU)
    assert str(tmp_path) in str(error.value) and folder in str(error.value)
    assert os.listdir(tmp_path) == []  # nothing written
