"""The offline benchmark tasks: fixed images on every machine, at least 1,000 validation images,
and the distorted copies of one digit never split between training and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig, with_overrides
from trainer.datasets import read_source, split_indices
from trainer.hard_tasks import digits_hard, synthetic_hard


@pytest.mark.parametrize("name", ["digits-hard", "synthetic-hard"])
def test_a_hard_task_is_fixed_and_validates_on_a_thousand_images(name: str) -> None:
    cfg = with_overrides(TrainConfig(), {"dataset": name})
    source = read_source(cfg)
    again = read_source(cfg)
    assert source.images is not None and again.images is not None
    assert torch.equal(source.images, again.images)
    assert (source.labels == again.labels).all()
    assert source.image_size == 16 and len(source.classes) == 10
    assert np.bincount(source.labels).min() >= len(source) // 12  # balanced enough
    splits = split_indices(source.labels, split_seed=cfg.split_seed,
                           val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                           groups=source.groups)
    assert len(splits["val"]) >= 1000
    assert sum(len(p) for p in splits.values()) == len(source)
    assert len(np.unique(np.concatenate(list(splits.values())))) == len(source)


def test_copies_of_one_digit_share_a_split() -> None:
    images, labels, groups = digits_hard()
    assert len(images) == 4 * len(np.unique(groups))
    splits = split_indices(labels, split_seed=3, val_fraction=0.2, test_fraction=0.2,
                           groups=groups)
    where = {}
    for name, part in splits.items():
        for g in np.unique(groups[part]):
            assert where.setdefault(int(g), name) == name, f"group {g} in {where[g]} and {name}"
    # The copies differ: the distortions are independent.
    first = np.flatnonzero(groups == 0)
    assert len({images[i].numpy().tobytes() for i in first}) == 4


def test_synthetic_hard_is_not_separable_by_colour_alone() -> None:
    images, labels = synthetic_hard()
    means = images.float().mean(dim=(2, 3))  # (n, 3) mean colour
    per_class = torch.stack([means[torch.from_numpy(labels == c)].mean(0) for c in range(10)])
    assert (per_class.max(0).values - per_class.min(0).values).max() < 8  # of 255
