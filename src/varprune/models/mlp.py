"""A multilayer perceptron with BatchNorm: the CPU-sized model of the demo.

Two hidden layers of 1024 units hold 1.8M prunable weights for 28 px inputs at
a fraction of a CNN's compute, so on two CPU cores it trains for enough steps
for VAR's effect to show.
"""

from __future__ import annotations

from torch import nn

from .registry import check_int, register_model


def _mlp(in_features: int, num_classes: int, width: int = 1024, depth: int = 2) -> nn.Sequential:
    check_int("width", width, 1, 65536)
    check_int("depth", depth, 1, 256)
    layers: list[nn.Module] = [nn.Flatten()]
    cin = in_features
    for _ in range(depth):
        layers += [nn.Linear(cin, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        cin = width
    return nn.Sequential(*layers, nn.Linear(cin, num_classes))


@register_model("mlp", "MLP, two hidden layers of 1024 with BatchNorm (1.8M weights at 28 px; options width, depth)")
def mlp(in_channels=1, num_classes=10, image_size=28, width=1024, depth=2):
    return _mlp(in_channels * image_size * image_size, num_classes, width=width, depth=depth)
