"""CIFAR-style ResNets (He et al. 2016, section 4.2): 6n+2 layers for 32x32 images.

A 3x3 stem, three stages of n basic blocks at 16/32/64 channels (times a width multiplier), stride
2 at the first block of stages 2 and 3, global average pooling and a linear head. Shortcuts that
change shape are 1x1 conv + BN projections (the paper's option B). Module names follow
torchvision's ResNet (conv1, bn1, layer1.., fc) so the same stage, head and pretrained logic
serves both families.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from trainer.se_blocks import SEBasicBlock

CIFAR_BLOCKS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}  # depth -> n blocks per stage
BASE_WIDTHS = (16, 32, 64)


def stage_widths(width: float) -> tuple[int, int, int]:
    """Channels of the three stages for a width multiplier: rounded, at least 1."""
    a, b, c = (max(1, round(base * width)) for base in BASE_WIDTHS)
    return a, b, c


class CifarResNet(nn.Module):
    def __init__(
        self,
        blocks_per_stage: int,
        widths: tuple[int, int, int],
        num_classes: int,
        in_channels: int = 3,
        se: bool = False,
    ) -> None:
        super().__init__()
        block = SEBasicBlock if se else BasicBlock
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = widths[0]
        self.layer1 = self._make_layer(block, widths[0], blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(block, widths[1], blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(block, widths[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(widths[2], num_classes)

    def _make_layer(
        self, block: type[BasicBlock], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(blocks):
            block_stride = stride if i == 0 else 1
            downsample = None
            if block_stride != 1 or self.inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, 1, stride=block_stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            layers.append(block(self.inplanes, planes, block_stride, downsample))
            self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))
