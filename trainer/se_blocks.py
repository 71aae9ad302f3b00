"""Residual blocks with squeeze-and-excitation (Hu et al. 2018) on the residual branch.

The blocks subclass torchvision's, so a net built from them has torchvision's state-dict keys
plus `<block>.se.*`: plain pretrained weights load into an SE net unchanged, and only the SE
modules start fresh.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import SqueezeExcitation


class SEBasicBlock(BasicBlock):
    """torchvision's BasicBlock with `se` applied to the residual branch before the addition.

    `se` is an Identity until `add_squeeze_excite` installs the real module: torchvision's
    `ResNet` constructs blocks with a fixed signature that has no room for the reduction ratio.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.se: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + identity)


class SEBottleneck(Bottleneck):
    """torchvision's Bottleneck with `se` on the residual branch; see `SEBasicBlock`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.se: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def last_bn(block: nn.Module) -> nn.BatchNorm2d | None:
    """The BatchNorm closing a residual branch, or None when `block` is not a residual block."""
    if isinstance(block, Bottleneck):
        return block.bn3
    if isinstance(block, BasicBlock):
        return block.bn2
    return None


def add_squeeze_excite(model: nn.Module, reduction: int) -> int:
    """Install an SE module of `max(1, channels // reduction)` hidden channels in every SE block.

    Returns the number of blocks that got one.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, SEBasicBlock | SEBottleneck):
            bn = last_bn(module)
            assert bn is not None  # an SE block is a BasicBlock or a Bottleneck
            channels = bn.num_features
            module.se = SqueezeExcitation(channels, max(1, channels // reduction))
            count += 1
    return count
