"""VGG-16 with BatchNorm for 28 and 32 pixel inputs (ceil-mode pooling keeps
28 px inputs at 1x1 after five pools), one linear classifier."""

from __future__ import annotations

from torch import nn

from .registry import check_int, register_model

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, plan, in_channels: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in plan:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_model("vgg16_bn", "VGG-16 with BatchNorm, CIFAR head (14.7M weights; option width)")
def vgg16_bn(in_channels=3, num_classes=10, image_size=32, width=64):
    """``width``: channels of the first stage (64); every stage scales with it (width=16: 0.92M weights)."""
    check_int("width", width, 1, 4096)
    return VGG(tuple(v if v == "M" else v * width // 64 or 1 for v in VGG16), in_channels, num_classes)
