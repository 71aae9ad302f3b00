"""Contracts of trainer.models: every ResNet builds and trains, has the promised shape, loads
pretrained weights strictly and safely, and keeps frozen stages (BN statistics included) fixed."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import SqueezeExcitation

from trainer.config import MODELS, ConfigError, TrainConfig
from trainer.models import build_model, is_head, model_stages, train_mode
from trainer.se_blocks import SEBasicBlock, add_squeeze_excite, last_bn

CIFAR_N = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
SMALL = TrainConfig(model="resnet20", width=0.25)


def build(
    seed: int = 0, num_classes: int = 10, in_channels: int = 3, **fields: object
) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(replace(SMALL, **fields), num_classes, in_channels)


def randomized(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every tensor, buffers included, set to something distinctive."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}


def backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not is_head(k)}


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_one_step(name: str) -> None:
    model = build(model=name, small_stem=True, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    nn.functional.cross_entropy(out, torch.tensor([0, 6])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_one_channel_small_images() -> None:
    model = build(in_channels=1, num_classes=10)
    assert model.conv1.weight.shape[1] == 1
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(CIFAR_N))
def test_cifar_depth_is_6n_plus_2(name: str) -> None:
    model = build(model=name)
    weight_layers = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear) and "downsample" not in n
    ]
    assert len(weight_layers) == 6 * CIFAR_N[name] + 2
    assert len(model_stages(model)) == 4


@pytest.mark.parametrize(
    ("width", "channels"), [(1.0, (16, 32, 64)), (0.5, (8, 16, 32)), (0.01, (1, 1, 1))]
)
def test_width_multiplies_channels(width: float, channels: tuple[int, int, int]) -> None:
    model = build(width=width)
    stages = model_stages(model)[1:]
    assert model.conv1.out_channels == channels[0]
    assert tuple(stage[-1].conv2.out_channels for stage in stages) == channels
    assert model.fc.in_features == channels[2]
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_torchvision_stems(in_channels: int) -> None:
    small = build(model="resnet18", small_stem=True, in_channels=in_channels)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.in_channels == in_channels
    assert isinstance(small.maxpool, nn.Identity)
    large = build(model="resnet18", small_stem=False, in_channels=in_channels)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.stride == (2, 2)
    assert large.conv1.in_channels == in_channels
    assert isinstance(large.maxpool, nn.MaxPool2d)
    assert large(torch.randn(2, in_channels, 64, 64)).shape == (2, 10)
    assert len(model_stages(large)) == 5


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_nets_have_torchvision_keys(name: str) -> None:
    ours = build(model=name, small_stem=False).state_dict()
    theirs = torchvision.models.get_model(name, weights=None, num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_same_seed_same_model() -> None:
    a, b = build(seed=3).state_dict(), build(seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], build(seed=4).state_dict()["conv1.weight"])


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_residual_branches_start_at_zero(name: str) -> None:
    model = build(model=name)
    last = {id(last_bn(m)) for m in model.modules() if last_bn(m) is not None}
    assert last
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == (0.0 if id(m) in last else 1.0))
            assert torch.all(m.bias == 0)


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 9), ("resnet18", 8), ("resnet50", 16)])
def test_se_in_every_block(name: str, blocks: int) -> None:
    model = build(model=name, se=True, se_reduction=8)
    residual = [m for m in model.modules() if last_bn(m) is not None]
    assert len(residual) == blocks
    for block in residual:
        assert isinstance(block.se, SqueezeExcitation)
        channels = last_bn(block).num_features
        assert block.se.fc1.out_channels == max(1, channels // 8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_se_scales_the_branch_before_the_addition() -> None:
    torch.manual_seed(0)
    block = SEBasicBlock(4, 4)
    assert add_squeeze_excite(block, reduction=16) == 1
    nn.init.ones_(block.bn2.weight)
    block.eval()
    x = torch.randn(2, 4, 6, 6)
    assert not torch.allclose(block(x), torch.relu(x))
    with torch.no_grad():  # a closed gate: the branch contributes nothing, the shortcut remains
        block.se.fc2.weight.zero_()
        block.se.fc2.bias.fill_(-1e4)
    assert torch.allclose(block(x), torch.relu(x))


def test_dropout_sits_before_the_head() -> None:
    model = build(dropout=0.5)
    assert isinstance(model.fc[0], nn.Dropout) and model.fc[0].p == 0.5
    assert isinstance(model.fc[1], nn.Linear)
    x = torch.randn(4, 3, 16, 16)
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    "fields", [{}, {"dropout": 0.2}, {"se": True}, {"model": "resnet18", "dropout": 0.1}]
)
def test_is_head_is_exactly_the_classifier(fields: dict[str, object]) -> None:
    model = build(**fields)
    head = {f"fc.{n}" for n, _ in model.fc.named_parameters()}
    assert len(head) == 2
    assert {n for n, _ in model.named_parameters() if is_head(n)} == head


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("resnet20", "state_dict"),
        ("resnet20", "checkpoint"),
        ("resnet20", "compiled"),
        ("resnet18", "checkpoint"),
    ],
)
def test_pretrained_backbone_is_copied_and_head_is_new(
    tmp_path: Path, name: str, layout: str
) -> None:
    saved = randomized(build(model=name, num_classes=10))
    obj: object = {
        "state_dict": saved,
        "checkpoint": {"model": saved, "epoch": 3, "best": 0.5},
        "compiled": {f"_orig_mod.{k}": v for k, v in saved.items()},
    }[layout]
    torch.save(obj, tmp_path / "w.pt")
    model = build(model=name, num_classes=3, pretrained=str(tmp_path / "w.pt"))
    state = model.state_dict()
    assert backbone(state).keys() == backbone(saved).keys()
    assert all(torch.equal(state[k], v) for k, v in backbone(saved).items())
    assert model.fc.weight.shape == (3, saved["fc.weight"].shape[1])
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize(("name", "small_stem"), [("resnet20", True), ("resnet18", False)])
def test_grey_stem_sums_rgb_kernels(tmp_path: Path, name: str, small_stem: bool) -> None:
    saved = randomized(build(model=name, small_stem=small_stem))
    torch.save(saved, tmp_path / "rgb.pt")
    model = build(
        model=name, small_stem=small_stem, in_channels=1, pretrained=str(tmp_path / "rgb.pt")
    )
    assert torch.allclose(model.conv1.weight, saved["conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])


def test_other_stem_shapes_stay_fresh(tmp_path: Path) -> None:
    saved = randomized(build(model="resnet18", small_stem=False))
    torch.save(saved, tmp_path / "imagenet-stem.pt")
    model = build(model="resnet18", small_stem=True, pretrained=str(tmp_path / "imagenet-stem.pt"))
    fresh = build(model="resnet18", small_stem=True)
    assert torch.equal(model.conv1.weight, fresh.conv1.weight)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone(saved).items() if k != "conv1.weight")


def test_se_model_from_plain_and_from_se_weights(tmp_path: Path) -> None:
    plain = randomized(build())
    torch.save(plain, tmp_path / "plain.pt")
    model = build(se=True, pretrained=str(tmp_path / "plain.pt"))
    fresh = build(se=True).state_dict()
    for k, v in backbone(model.state_dict()).items():
        assert torch.equal(v, fresh[k] if ".se." in k else plain[k]), k

    with_se = randomized(build(se=True))
    torch.save(with_se, tmp_path / "se.pt")
    state = build(se=True, pretrained=str(tmp_path / "se.pt")).state_dict()
    assert all(torch.equal(state[k], v) for k, v in backbone(with_se).items())
    with pytest.raises(ConfigError, match=r"se\.fc1\.weight is in the file but not in the model"):
        build(pretrained=str(tmp_path / "se.pt"))


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ({"model": "resnet32"}, "layer1.3.conv1.weight"),
        ({"width": 0.5}, "conv1.weight"),
        ({"model": "resnet18"}, "conv1.weight has shape (64, 3, 3, 3)"),
    ],
)
def test_wrong_architecture_is_refused(tmp_path: Path, source: dict[str, object], key: str) -> None:
    path = tmp_path / "other.pt"
    torch.save(build(**source).state_dict(), path)
    with pytest.raises(ConfigError) as err:
        build(pretrained=str(path))
    assert str(path) in str(err.value) and key in str(err.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pt"
    with pytest.raises(ConfigError, match=r"nowhere\.pt"):
        build(pretrained=str(path))


@pytest.mark.parametrize("content", [[1, 2, 3], {"model": {}}, {"conv1.weight": "not a tensor"}])
def test_not_a_state_dict_is_refused(tmp_path: Path, content: object) -> None:
    torch.save(content, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match=r"odd\.pt"):
        build(pretrained=str(tmp_path / "odd.pt"))


class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_pickle_is_refused_without_running(tmp_path: Path, writer: str) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"model": {"conv1.weight": _Payload(marker)}}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(ConfigError, match=r"evil\.pt"):
        build(pretrained=str(path))
    assert not marker.exists()
    if writer == "torch.save":  # the payload is live: an unsafe load does run it
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_torchvision_registry_names_are_checked_offline() -> None:
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build(model="resnet18", pretrained="torchvision:NO_SUCH_WEIGHTS")
    with pytest.raises(ConfigError, match="resnet20"):
        build(model="resnet20", pretrained="torchvision:IMAGENET1K_V1")


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_frozen_stages_do_not_move(name: str) -> None:
    model = build(model=name, freeze_stages=2)
    stages = model_stages(model)
    frozen, trained = stages[:2], stages[2:]
    assert all(not p.requires_grad for s in frozen for p in s.parameters())
    assert all(p.requires_grad for s in trained for p in s.parameters())
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in stages]

    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        train_mode(model)
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (4,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    norms = [[m for m in s.modules() if isinstance(m, nn.BatchNorm2d)] for s in stages]
    assert all(not bn.training for group in norms[:2] for bn in group)
    assert all(bn.training for group in norms[2:] for bn in group)
    for stage, old in zip(stages, before, strict=True):
        new = stage.state_dict()
        moved = {k for k in old if not torch.equal(old[k], new[k])}
        if stage in frozen:
            assert not moved
        else:
            assert any(k.endswith("running_mean") for k in moved)
            assert any(k.endswith("weight") and "bn" not in k for k in moved)


def test_freezing_more_stages_than_exist_is_refused() -> None:
    with pytest.raises(ConfigError, match="freeze_stages"):
        build(freeze_stages=5)
    model = build(model="resnet18", freeze_stages=5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
