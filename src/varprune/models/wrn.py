"""Wide ResNets (Zagoruyko & Komodakis, BMVC 2016), as used by the pruning literature.

WRN-d-k: a 3x3 stem with 16 channels, then three groups of ``(d - 4) / 6``
pre-activation blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) of width
16k, 32k and 64k, the last two groups starting with stride 2, then
BN-ReLU-global average pool-linear. A block that changes shape adds a 1x1
convolution shortcut applied to the block's pre-activated input (as in the
authors' code); otherwise the shortcut is the identity. Dropout is 0 by
default (the CIFAR runs of CrAM and most pruning papers). Convolutions carry
no bias, are He-initialised (fan-out), BatchNorm starts at (1, 0) and the
classifier bias at 0.

WRN-28-10 holds 36.5M parameters and WRN-16-8 11.0M for 10 classes. Global
average pooling makes the networks work at 28, 32 or 64 px.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_model


class WideBlock(nn.Module):
    """Pre-activation basic block; ``shortcut`` is a 1x1 conv when shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = float(dropout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv1(a)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen``; ``depth`` must be 6n + 4."""

    def __init__(self, depth: int, widen: int, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        groups, cin = [], 16
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, width, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = width
            groups.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*groups)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layers(self.conv1(x))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register_model("wrn16_8", "Wide ResNet 16-8, pre-activation, 128-512 channels (11.0M weights)")
def wrn16_8(in_channels=3, num_classes=10, image_size=32):
    return WideResNet(16, 8, in_channels, num_classes)


@register_model("wrn28_10", "Wide ResNet 28-10, pre-activation, 160-640 channels (36.5M weights)")
def wrn28_10(in_channels=3, num_classes=10, image_size=32):
    return WideResNet(28, 10, in_channels, num_classes)
