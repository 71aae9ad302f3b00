"""Focal loss end to end, on an imbalanced image folder written here from scikit-learn's digits:
two common classes and two rare ones at 1/8 of their count. Focal and cross entropy train from
the same seed at equal epochs; both learn and report valid per-class figures, and focal trains
something else (its own loss), alone and with balanced class weights and smoothing.

What the test does not assert is that focal beats cross entropy on the rare classes: on a few
rare test images that is a measurement, not a guarantee. The figures of both runs are printed
(`pytest -s`), and bench/focal_loss.py measures the comparison over ten seeds (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from trainer.config import TrainConfig
from trainer.contract import Result
from trainer.train import train

COUNTS = {3: 160, 8: 160, 5: 20, 9: 20}  # digit -> images; 5 and 9 are the rare classes
RARE = ("digit5", "digit9")
CLASSES = sorted(f"digit{d}" for d in COUNTS)  # the trainer's order: sorted folder names


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced")
    digits = load_digits()
    for digit, count in COUNTS.items():
        (root / f"digit{digit}").mkdir()
        for i, image in enumerate(digits.images[digits.target == digit][:count]):
            pixels = (image * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / f"digit{digit}" / f"{i:03d}.png")
    return root


def base(root: Path) -> TrainConfig:
    return TrainConfig(
        dataset=f"imagefolder:{root}", image_size=8, model="resnet20", width=0.25,
        batch_size=32, lr=0.1, crop_pad=0, hflip=False, epochs=10, device="cpu", amp="off",
        test_fraction=0.3,
    )  # fmt: skip


def rare_recall(result: Result) -> float:
    assert result.confusion is not None
    rows = [result.confusion[CLASSES.index(c)] for c in RARE]
    return sum(row[CLASSES.index(c)] for c, row in zip(RARE, rows, strict=True)) / sum(
        map(sum, rows))


def check_report(result: Result) -> None:
    """A 4-class test report that adds up, on the imbalanced split the folder holds."""
    assert result.confusion is not None and result.test_f1 is not None
    assert len(result.confusion) == len(result.test_f1) == len(CLASSES)
    per_class = [sum(row) for row in result.confusion]
    assert sum(per_class) == result.data["n_test"]
    for name, n in zip(CLASSES, per_class, strict=True):
        # Stratified: about 30% of each class is in the test split.
        assert abs(n - 0.3 * COUNTS[int(name.removeprefix("digit"))]) <= 1.5, (name, n)
    assert result.test_macro_f1 == pytest.approx(sum(result.test_f1) / 4)
    assert 0.0 <= rare_recall(result) <= 1.0


@pytest.mark.parametrize("fields", [{}, {"class_weights": "balanced", "label_smoothing": 0.1}])
def test_focal_and_cross_entropy_from_one_seed_both_learn(
    imbalanced: Path, fields: dict[str, object]
) -> None:
    config = replace(base(imbalanced), **fields)
    ce = train(config)
    focal = train(replace(config, loss="focal", focal_gamma=2.0))
    assert focal.config["loss"] == "focal" and ce.config["loss"] == "cross_entropy"
    for result in (ce, focal):
        check_report(result)
        # Above always predicting a common class (~0.44 of the test split): it separates.
        assert result.test_acc is not None and result.test_acc > 0.6
    # The same seed, data and model: only the loss differs, and the training follows it.
    assert focal.history[0]["train_loss"] != ce.history[0]["train_loss"]
    print(f"\n{fields or 'plain'}: test_acc ce {ce.test_acc:.3f} focal {focal.test_acc:.3f};"
          f" rare recall ce {rare_recall(ce):.3f} focal {rare_recall(focal):.3f}; macro-F1 ce"
          f" {ce.test_macro_f1:.3f} focal {focal.test_macro_f1:.3f} (one seed, {config.epochs}"
          " epochs)")


def test_focal_at_gamma_zero_trains_exactly_as_cross_entropy(imbalanced: Path) -> None:
    # Bit for bit would ask too much of two different reductions; to float rounding, epoch by
    # epoch, with the smoothing and weights the equivalence covers.
    config = replace(base(imbalanced), epochs=2, class_weights="balanced", label_smoothing=0.1)
    ce = train(config)
    focal0 = train(replace(config, loss="focal", focal_gamma=0.0))
    for a, b in zip(ce.history, focal0.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
