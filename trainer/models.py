"""The model a `TrainConfig` asks for: which ResNet, its stem, SE, dropout, pretrained weights and
frozen stages, behind `build_model`. The training loop also needs `is_head` (the new classifier's
parameters, e.g. for a separate learning rate) and `train_mode` (train, but frozen BN stays put).

Every model has torchvision's module names: conv1/bn1 (the stem), layer1.. (the stages) and `fc`
(the classifier; `fc.1` behind `fc.0`, a Dropout, when dropout > 0).
"""

from __future__ import annotations

import logging

from torch import nn
from torchvision.models import ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from trainer import pretrained
from trainer.config import ConfigError, TrainConfig
from trainer.resnet_cifar import CIFAR_BLOCKS, CifarResNet, stage_widths
from trainer.se_blocks import SEBasicBlock, SEBottleneck, add_squeeze_excite, last_bn

log = logging.getLogger(__name__)

Block = type[BasicBlock | Bottleneck]
# depth -> (block, SE variant, blocks per stage), as torchvision.models.resnet<depth> builds them
TORCHVISION_LAYOUTS: dict[int, tuple[Block, Block, list[int]]] = {
    18: (BasicBlock, SEBasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, SEBasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, SEBottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, SEBottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, SEBottleneck, [3, 8, 36, 3]),
}
HEAD = "fc"
FROZEN_ATTR = "frozen_stages"  # set on the model by build_model; read by train_mode
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> nn.Module:
    """A freshly initialised (or pretrained) model on the CPU, in `train_mode`.

    Deterministic given `torch.manual_seed`. Raises ConfigError for an unknown model, a bad
    pretrained source, or more frozen stages than the model has.
    """
    depth = _depth(cfg.model)
    model = _architecture(cfg, depth, num_classes, in_channels)
    stages = len(model_stages(model))
    if cfg.freeze_stages > stages:
        raise ConfigError(
            f"freeze_stages: {cfg.freeze_stages} is more than the {stages} stages of {cfg.model}"
            f" (stem + {stages - 1} residual stages)"
        )
    init_weights(model)
    stem_fresh = False
    if cfg.pretrained:
        state = pretrained.read_source(cfg.pretrained, cfg.model)
        report = pretrained.load_into(model, state, cfg.pretrained, is_head)
        stem_fresh = pretrained.STEM_KEY in report.fresh
        log.info(
            "pretrained %s: %d tensors loaded, adapted %s, fresh %s",
            cfg.pretrained,
            report.loaded,
            report.adapted or "none",
            report.fresh or "none",
        )
    if stem_fresh and cfg.freeze_stages >= 1:
        log.warning(
            "freeze_stages=%d freezes a stem that pretrained %s could not fill (its shape"
            " differs): it stays at its random initialisation",
            cfg.freeze_stages,
            cfg.pretrained,
        )
    freeze(model, cfg.freeze_stages)
    train_mode(model)
    return model


def _depth(name: str) -> int:
    depth = name.removeprefix("resnet")
    if not (name.startswith("resnet") and depth.isdigit()) or (
        int(depth) not in CIFAR_BLOCKS and int(depth) not in TORCHVISION_LAYOUTS
    ):
        known = sorted([*CIFAR_BLOCKS, *TORCHVISION_LAYOUTS])
        raise ConfigError(f"model: {name!r} is not one of {', '.join(f'resnet{d}' for d in known)}")
    return int(depth)


def _architecture(cfg: TrainConfig, depth: int, num_classes: int, in_channels: int) -> nn.Module:
    model: nn.Module
    if depth in CIFAR_BLOCKS:
        model = CifarResNet(
            CIFAR_BLOCKS[depth], stage_widths(cfg.width), num_classes, in_channels, se=cfg.se
        )
    else:
        plain, with_se, layers = TORCHVISION_LAYOUTS[depth]
        model = ResNet(with_se if cfg.se else plain, layers, num_classes=num_classes)
        if cfg.small_stem:
            # 32 px images would be 8 px after the 7x7/2 conv and the max-pool: keep resolution.
            model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        elif in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    if cfg.se:
        add_squeeze_excite(model, cfg.se_reduction)
    if cfg.dropout > 0:
        # get_submodule, not `model.fc`: nn.Module's __getattr__ is typed Tensor | Module.
        model.fc = nn.Sequential(nn.Dropout(cfg.dropout), model.get_submodule(HEAD))
    return model


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, BN at identity, and the last BN of every residual branch at zero,
    so each block starts as the identity (Goyal et al. 2017). Linear layers keep torch's init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        bn = last_bn(m)
        if bn is not None:
            nn.init.zeros_(bn.weight)


def is_head(param_name: str) -> bool:
    """True for the classifier's parameters: the new head, never pretrained."""
    for prefix in _WRAPPER_PREFIXES:
        param_name = param_name.removeprefix(prefix)
    return param_name.startswith(HEAD + ".")


def model_stages(model: nn.Module) -> list[nn.Module]:
    """(stem, layer1, layer2, ...) in forward order. The stem is a Sequential view of conv1 and
    bn1, made on each call and sharing the model's modules."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    stem = nn.Sequential(model.get_submodule("conv1"), model.get_submodule("bn1"))
    layers = []
    i = 1
    while hasattr(model, f"layer{i}"):
        layers.append(getattr(model, f"layer{i}"))
        i += 1
    return [stem, *layers]


def freeze(model: nn.Module, k: int) -> None:
    """Stop gradients to the first k stages and have `train_mode` keep them in eval mode; the
    stages after them train. Called again with a smaller k (gradual unfreezing), it thaws."""
    for i, stage in enumerate(model_stages(model)):
        for p in stage.parameters():
            p.requires_grad_(i >= k)
    setattr(getattr(model, "_orig_mod", model), FROZEN_ATTR, k)


def frozen_at(epoch: int, freeze_stages: int, unfreeze_every: int) -> int:
    """How many stages are frozen while epoch `epoch` (counted from 0) trains.

    Gradual unfreezing thaws from the top: after every `unfreeze_every` epochs the deepest
    frozen stage (the one nearest the head, whose features are the most task-specific) trains
    again, the stem last. A pure function of the epoch, so a resumed run freezes what the
    uninterrupted run froze."""
    if unfreeze_every == 0:
        return freeze_stages
    return max(0, freeze_stages - epoch // unfreeze_every)


def train_mode(model: nn.Module) -> None:
    """`model.train()`, except that frozen stages stay in eval mode, so their BatchNorm layers
    neither update running statistics nor normalise with batch statistics."""
    model.train()
    k = getattr(getattr(model, "_orig_mod", model), FROZEN_ATTR, 0)
    for stage in model_stages(model)[:k]:
        stage.eval()
