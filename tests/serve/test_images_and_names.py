"""In-process checks of what the service feeds the model and how it names classes: an upload is
decoded exactly as training decoded image folders, every image mode reaches the same pixels, bad
files are refused with their HTTP status, models of different data do not form an ensemble, and
the report names classes from the checkpoint."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from search.results.report import _class_names
from tests.serve.helpers import bomb_png, digit_image, encode, noise_png
from trainer.bundle import from_checkpoints
from trainer.config import ConfigError, TrainConfig
from trainer.datasets import decode_image
from trainer.predict import ImageError, decode_upload
from trainer.train import train

TINY = dict(model="resnet20", width=0.25, batch_size=64, epochs=1, device="cpu", crop_pad=0)


def test_an_upload_is_decoded_as_training_decoded_image_folders(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for size, (w, h) in ((32, (90, 50)), (32, (20, 20)), (16, (16, 16))):
        path = tmp_path / f"photo-{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        want = decode_image(str(path), size)
        assert torch.equal(decode_upload(path.read_bytes(), size, 3), want), (w, h, size)


def test_every_mode_reaches_the_same_pixels() -> None:
    pixels = digit_image(2)
    exact = decode_upload(encode(pixels, "png-gray", size=8), 8, 1)
    assert exact.shape == (1, 8, 8) and exact.dtype == torch.uint8
    assert torch.equal(exact[0], torch.from_numpy(pixels))
    reference = decode_upload(encode(pixels, "png-gray"), 8, 1)  # 64 px, shrunk as in training
    for kind in ("png-rgb", "png-rgba", "png-palette", "png-16bit"):
        assert torch.equal(decode_upload(encode(pixels, kind), 8, 1), reference), kind
    # JPEG is lossy: close, not equal.
    jpeg = decode_upload(encode(pixels, "jpeg"), 8, 1)
    assert (jpeg.int() - reference.int()).abs().max() <= 12
    # A grayscale image for a colour model: the same value in R, G and B.
    rgb = decode_upload(encode(pixels, "png-gray"), 8, 3)
    assert rgb.shape == (3, 8, 8) and torch.equal(rgb[0], rgb[2])
    cmyk = io.BytesIO()
    Image.fromarray(pixels).convert("CMYK").save(cmyk, "JPEG")
    assert decode_upload(cmyk.getvalue(), 8, 3).shape == (3, 8, 8)


@pytest.mark.parametrize(("data", "status", "words"), [
    (b"", 400, "empty"),
    (b"GIF89a but not really", 415, "not an image"),
    (noise_png(200, 200)[:5000], 422, "truncated"),
    (bomb_png(), 413, "limit"),
])
def test_bad_files_are_refused_with_their_status(data: bytes, status: int, words: str) -> None:
    with pytest.raises(ImageError, match=words) as caught:
        decode_upload(data, 8, 1, max_pixels=10_000_000)
    assert caught.value.status == status


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model on digits and one on the synthetic set (classes named class0..class9)."""
    root = tmp_path_factory.mktemp("names")
    out = {}
    for dataset, extra in (("digits", {}), ("synthetic", {"image_size": 8})):
        folder = root / dataset
        train(TrainConfig(dataset=dataset, checkpoint_dir=str(folder), **TINY, **extra))
        out[dataset] = folder / "best.pt"
    return out


def test_the_report_names_classes_from_the_checkpoint(two_checkpoints: dict[str, Path]) -> None:
    names = _class_names({"checkpoint": str(two_checkpoints["synthetic"])}, 10)
    assert names == [f"class{i}" for i in range(10)]
    assert _class_names({"checkpoint": str(two_checkpoints["digits"])}, 10) == \
        [str(i) for i in range(10)]
    # Not on this machine: the indices, and the report is still written.
    assert _class_names({"checkpoint": "/nowhere/best.pt"}, 3) == ["0", "1", "2"]


def test_models_of_different_data_do_not_form_an_ensemble(
    two_checkpoints: dict[str, Path]
) -> None:
    paths = [two_checkpoints["digits"], two_checkpoints["synthetic"]]
    with pytest.raises(ConfigError, match="the same data split"):
        from_checkpoints(paths, [{}, {}])
