"""CIFAR-style ResNets: 3x3 stem without max-pool, for 28 and 32 pixel inputs.

resnet18: four stages of BasicBlocks (64..512 channels, 11M weights), the
variant used for CIFAR by most pruning papers. resnet20/56: He et al.'s
three-stage CIFAR networks (16..64 channels); shortcuts that change shape are
1x1 convolutions with BatchNorm (option B), so every weight is a conv or
linear weight that pruning sees.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths, depths, in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


@register_model("resnet18", "ResNet-18, CIFAR stem, 64-512 channels (11.2M weights)")
def resnet18(in_channels=3, num_classes=10, image_size=32):
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), in_channels, num_classes)


@register_model("resnet20", "ResNet-20 for CIFAR, 16-64 channels (0.27M weights)")
def resnet20(in_channels=3, num_classes=10, image_size=32):
    return ResNet((16, 32, 64), (3, 3, 3), in_channels, num_classes)


@register_model("resnet56", "ResNet-56 for CIFAR, 16-64 channels (0.85M weights)")
def resnet56(in_channels=3, num_classes=10, image_size=32):
    return ResNet((16, 32, 64), (9, 9, 9), in_channels, num_classes)
