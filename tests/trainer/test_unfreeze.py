"""Gradual unfreezing (`unfreeze_every`), trained on scikit-learn's real digits: a frozen stage,
its BatchNorm statistics included, stays exactly as loaded until its epoch and trains from then
on; the optimizer holds every parameter from the start, at its group's rate and decay, with no
momentum state while frozen; a run resumed between two thaws equals the uninterrupted one; and
its kept model loads for evaluation like any other.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from trainer import checkpoint
from trainer.config import ConfigError, TrainConfig, with_overrides
from trainer.contract import Result
from trainer.export import evaluate_saved
from trainer.models import build_model, frozen_at, is_head
from trainer.optim import make_optimizer
from trainer.train import train

# As tests/trainer/test_train.py's FAST: a quarter-width resnet20, fp32, no random crops.
FAST = TrainConfig(
    dataset="digits", model="resnet20", width=0.25, batch_size=32, lr=0.1, crop_pad=0,
    epochs=3, device="cpu", amp="off",
)  # fmt: skip
# resnet20's stages: the stem (conv1, bn1), layer1, layer2, layer3. freeze_stages = 2 with
# unfreeze_every = 1: epoch 1 trains layer2 on, epoch 2 thaws layer1, epoch 3 the stem.
STAGES = {"stem": ("conv1.", "bn1."), "layer1": ("layer1.",), "layer2": ("layer2.",)}
THAWED_IN = {"stem": 3, "layer1": 2, "layer2": 1}  # the first epoch (from 1) each one trains
GRADUAL = replace(FAST, freeze_stages=2, unfreeze_every=1, backbone_lr_mult=0.5)


def stage_of(key: str) -> str | None:
    return next((s for s, prefixes in STAGES.items() if key.startswith(prefixes)), None)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a model trained on digits: the pretrained weights fine-tuning starts from."""
    where = tmp_path_factory.mktemp("source")
    train(replace(FAST, epochs=2, checkpoint_dir=str(where)))
    return where / checkpoint.BEST


def test_the_schedule_thaws_from_the_deepest_frozen_stage_down() -> None:
    assert [frozen_at(e, 2, 1) for e in range(4)] == [2, 1, 0, 0]
    assert [frozen_at(e, 3, 2) for e in range(8)] == [3, 3, 2, 2, 1, 1, 0, 0]
    assert [frozen_at(e, 2, 0) for e in range(3)] == [2, 2, 2]  # off: frozen throughout


@pytest.mark.parametrize(("fields", "words"), [
    ({"unfreeze_every": 2}, ["unfreeze_every", "freeze_stages is 0"]),
    ({"freeze_stages": 2, "unfreeze_every": -1}, ["unfreeze_every", "-1", "outside"]),
    ({"freeze_stages": 2, "unfreeze_every": 1.5}, ["unfreeze_every", "integer"]),
])
def test_bad_unfreezing_is_refused_naming_the_field(fields: dict[str, Any], words: list[str]
                                                    ) -> None:
    with pytest.raises(ConfigError) as caught:
        with_overrides(FAST, fields)
    for word in words:
        assert word in str(caught.value)


def test_each_stage_stays_as_loaded_until_its_epoch_and_trains_after(
    source: Path, tmp_path: Path
) -> None:
    loaded: dict[str, Tensor] = checkpoint.load(source)["model"]
    config = replace(GRADUAL, seed=1, pretrained=str(source),
                     checkpoint_dir=str(tmp_path / "run"), checkpoint_seconds=0.0)
    states: list[dict[str, Any]] = []
    # checkpoint_seconds = 0: each epoch's last.pt is on disk before its report.
    result = train(config, report=lambda epoch, _: states.append(
        checkpoint.load(tmp_path / "run" / checkpoint.LAST)))
    assert [h["frozen_stages"] for h in result.history] == [2, 1, 0]

    for epoch, state in enumerate(states, start=1):
        model = state["model"]
        for stage, first in THAWED_IN.items():
            keys = [k for k in model if stage_of(k) == stage]
            assert any(k.endswith("running_var") for k in keys)
            moved = {k for k in keys if not torch.equal(model[k], loaded[k])}
            if epoch < first:  # frozen: parameters and BN buffers exactly as loaded
                assert not moved, (epoch, stage, sorted(moved))
            else:  # thawed: every tensor trains, running statistics included
                assert moved == set(keys), (epoch, stage, sorted(set(keys) - moved))

    # The optimizer held every parameter from the start; momentum state only once thawed.
    groups_of = _optimizer_order(config)
    names = [[n for n, _ in g] for g in groups_of]
    for epoch, state in enumerate(states, start=1):
        saved = state["optimizer"]
        assert [len(g["params"]) for g in saved["param_groups"]] == [len(g) for g in names]
        flat = [n for group in names for n in group]
        with_state = {flat[i] for i, s in saved["state"].items() if "momentum_buffer" in s}
        for name in flat:
            stage = stage_of(name)
            trains = stage is None or epoch >= THAWED_IN[stage]
            assert (name in with_state) == trains, (epoch, name)
    # Thawed backbone parameters at the backbone's rate, with decay on the convolutions.
    groups = states[-1]["optimizer"]["param_groups"]
    for group, members in zip(groups, groups_of, strict=True):
        head = {is_head(n) for n, _ in members}
        decays = {ndim > 1 for _, ndim in members}  # convolutions and the head's matrix
        assert len(head) == len(decays) == 1  # each group is one kind
        assert group["lr_mult"] == (1.0 if head == {True} else 0.5)
        assert group["weight_decay"] == (config.weight_decay if decays == {True} else 0.0)
    assert result.val_acc > 0.8


def test_resumed_between_two_thaws_it_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    config = replace(GRADUAL, checkpoint_dir=str(tmp_path / "whole"))
    whole = train(config)
    config = replace(config, checkpoint_dir=str(tmp_path / "parts"), checkpoint_seconds=0.0)

    class Stop(Exception):
        pass

    def stop_after_two(epoch: int, metrics: dict[str, Any]) -> None:
        if epoch == 2:  # layer1 thawed and holding momentum, the stem still frozen
            raise Stop

    with pytest.raises(Stop):
        train(config, report=stop_after_two)
    resumed = train(config)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert _computed(resumed) == _computed(whole)
    final = checkpoint.load(tmp_path / "parts" / checkpoint.LAST)
    expected = checkpoint.load(tmp_path / "whole" / checkpoint.LAST)
    for key, value in expected["model"].items():
        assert torch.equal(final["model"][key], value), key
    # The kept model loads on its own (export, evaluation, teacher) and scores as it did.
    assert evaluate_saved(whole.checkpoint, device="cpu")["test_acc"] == whole.test_acc


def _optimizer_order(config: TrainConfig) -> list[list[tuple[str, int]]]:
    """(name, ndim) of each optimizer group's parameters, in the order its state dict numbers
    them."""
    model = build_model(replace(config, pretrained=""), 10, 1)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, config)
    return [[(names[id(p)], p.ndim) for p in g["params"]] for g in optimizer.param_groups]


def _computed(result: Result) -> list[tuple[Any, ...]]:
    return [(h["train_loss"], h["val_loss"], h["val_acc"], h["frozen_stages"])
            for h in result.history] + [(result.test_acc, result.test_loss, result.confusion)]
