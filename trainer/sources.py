"""Where a dataset's files are, and whether they can be read, without reading them: torch-free,
so `hpo create` can refuse a pipeline whose data is not there before a fleet starts, and the
trainer lists an image folder with the same rules.
"""

from __future__ import annotations

import os

from trainer.config import TrainConfig
from trainer.errors import DataUnavailable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FOLDER_SIZE = 64  # pixels per side of image-folder images when cfg.image_size is 0
SYNTHETIC_SIZE = 32
NATIVE_SIZE = {"digits": 8, "cifar10": 32, "cifar100": 32, "synthetic": SYNTHETIC_SIZE,
               "digits-hard": 16, "synthetic-hard": 16}
# torchvision's file names: what CIFAR10/CIFAR100(download=False) look for.
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py",
                ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
}


def list_folder(root: str) -> tuple[list[str], list[str], list[int]]:
    """An ImageFolder's classes (sorted sub-folder names), image paths and their labels."""
    if not os.path.isdir(root):
        raise DataUnavailable(f"dataset imagefolder: {root!r} is not a folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataUnavailable(
            f"dataset imagefolder: {root!r} has no class sub-folders; expected"
            f" {root}/<class>/<image>.png"
        )
    paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for index, name in enumerate(classes):
        files = list_images(os.path.join(root, name))
        if not files:
            empty.append(name)
        paths += files
        labels += [index] * len(files)
    if empty:
        raise DataUnavailable(
            f"dataset imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in"
            f" {', '.join(os.path.join(root, e) for e in empty)}"
        )
    return classes, paths, labels


def list_images(folder: str) -> list[str]:
    """Image files under `folder`, recursively, in a fixed (sorted) order."""
    found = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        found += [os.path.join(parent, f) for f in sorted(files) if _is_image(f)]
    return found


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def check_readable(cfg: TrainConfig) -> None:
    """Raise DataUnavailable (or ConfigError's other kinds) when `cfg`'s dataset cannot be read
    here or does not suit its settings; reads listings, never images."""
    if cfg.dataset.startswith("imagefolder:"):
        root = cfg.dataset.removeprefix("imagefolder:")
        classes, _, _ = list_folder(root)
        if len(classes) < 2:
            raise DataUnavailable(
                f"dataset imagefolder: {root!r} has one class folder ({classes[0]!r}); a"
                " classifier needs at least two"
            )
        native = FOLDER_SIZE
    elif cfg.dataset in CIFAR_FILES:
        folder, files = CIFAR_FILES[cfg.dataset]
        path = os.path.join(cfg.data_root, folder)
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing and not cfg.download:
            raise DataUnavailable(
                f"dataset {cfg.dataset}: {path!r} lacks {', '.join(missing)}; set"
                f" download = true, or put {folder} in {cfg.data_root!r}"
            )
        native = NATIVE_SIZE[cfg.dataset]
    else:
        native = NATIVE_SIZE.get(cfg.dataset, 0)
    size = cfg.image_size or native
    if size and cfg.crop_pad >= size:
        raise DataUnavailable(
            f"crop_pad: {cfg.crop_pad} pixels of padding on {size}-pixel images leaves random"
            f" crops with no image in them; use less than {size}"
        )
