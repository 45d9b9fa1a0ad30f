"""2D segmentation networks: a U-Net and a U-Net with a ResNet-18 encoder.

Both return logits of shape ``(N, num_classes, H, W)`` for inputs of shape
``(N, in_channels, H, W)``, use BatchNorm after every hidden convolution, and
hold every weight that multiplies activations in an ``nn.Conv2d`` or
``nn.ConvTranspose2d`` (the final 1x1 classifier conv included), so
``varprune.weights.prunable_weights`` sees all of them, as the segmentation
protocol (docs/background.md) asks.

Input sizes: the encoders halve the resolution ``depth`` times (3 for
``unet_resnet18``), so H and W must be multiples of ``2**depth`` for the skip
connections to line up. Other sizes are accepted: ``forward`` zero-pads the
bottom and right edges up to the next multiple and crops the logits back to
``H x W``, so the output always has the input's spatial size.

Parameter counts (weights in conv layers, 1 input channel, 2 classes; all
parameters including BatchNorm and biases in brackets):

    unet           width=16, depth=3 (default)            0.481M  (0.482M)
    unet           width=32, depth=4                      7.76M   (7.76M)
    unet           width=64, depth=4 (Ronneberger-sized)  31.0M   (31.0M)
    unet_resnet18  width=64 (default)                     14.2M   (14.2M)
    unet_resnet18  width=16                               0.886M  (0.889M)

(``tests/test_unet.py`` recomputes the defaults' counts.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelError, check_int, register_model
from .resnet_cifar import BasicBlock


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice."""

    def __init__(self, cin: int, cout: int):
        super().__init__(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))


class Up(nn.Module):
    """Double the resolution, concatenate the skip, then :class:`DoubleConv`.

    ``mode="transpose"``: a 2x2 stride-2 transposed conv (cin -> cout);
    ``mode="bilinear"``: bilinear upsampling then a 1x1 conv (cin -> cout), so
    both modes carry learnable, prunable weights and give ``cout`` channels.
    """

    def __init__(self, cin: int, cskip: int, cout: int, mode: str = "transpose"):
        super().__init__()
        self.up: nn.Module
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), nn.Conv2d(cin, cout, 1, bias=False)
            )
        self.conv = DoubleConv(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    if x.dim() != 4:
        raise ModelError(f"segmentation models take (N, C, H, W) input; got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, h, w


class _PaddingSegmenter(nn.Module):
    """Pads inputs to a multiple of ``self.multiple`` and crops logits back."""

    multiple: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = _pad_to_multiple(x, self.multiple)
        out = self._forward(x)
        return out[..., :h, :w]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class UNet(_PaddingSegmenter):
    """U-Net (Ronneberger et al. 2015) with BatchNorm and same-padded convs.

    Level ``i`` (0..depth) has ``width * 2**i`` channels; the encoder max-pools
    between levels, the decoder upsamples (``up="transpose"`` or
    ``"bilinear"``), concatenates the encoder's feature map of the same level
    and applies a :class:`DoubleConv`; a final 1x1 conv gives ``num_classes``
    logits per pixel.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, depth: int = 3, up: str = "transpose"):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        check_int("width", width, 1, 4096)
        check_int("depth", depth, 1, 8)
        if up not in ("transpose", "bilinear"):
            raise ModelError(f"up must be 'transpose' or 'bilinear', not {up!r}")
        self.multiple = 2**depth
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            [DoubleConv(in_channels, chans[0])] + [DoubleConv(chans[i - 1], chans[i]) for i in range(1, depth + 1)]
        )
        self.up = nn.ModuleList([Up(chans[i], chans[i - 1], chans[i - 1], up) for i in range(depth, 0, -1)])
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)


class ResNet18UNet(_PaddingSegmenter):
    """U-Net decoder on a ResNet-18 encoder (randomly initialised, no download).

    Encoder: the CIFAR-style ResNet-18 of ``resnet_cifar`` (3x3 stem, no
    max-pool; four stages of two BasicBlocks, ``width * (1, 2, 4, 8)``
    channels, stages 2-4 at stride 2), so features come at full, 1/2, 1/4 and
    1/8 resolution. Decoder: three :class:`Up` blocks that take the stage
    outputs as skips, then a 1x1 conv. Inputs are padded to a multiple of 8.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, up: str = "transpose"):
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        check_int("width", width, 1, 4096)
        if up not in ("transpose", "bilinear"):
            raise ModelError(f"up must be 'transpose' or 'bilinear', not {up!r}")
        self.multiple = 8
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, chans[0]))
        stages, cin = [], chans[0]
        for i, c in enumerate(chans):
            stages.append(nn.Sequential(BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.up = nn.ModuleList([Up(chans[i], chans[i - 1], chans[i - 1], up) for i in range(3, 0, -1)])
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)


@register_model(
    "unet", "U-Net with BatchNorm, width 16, depth 3 (0.48M weights; options width, depth, up)", task="segmentation"
)
def unet(in_channels=1, num_classes=2, image_size=128, width=16, depth=3, up="transpose"):
    """U-Net; ``image_size`` is not needed (any size works) and is ignored."""
    return UNet(in_channels, num_classes, width=width, depth=depth, up=up)


@register_model(
    "unet_resnet18",
    "U-Net decoder on a ResNet-18 encoder, width 64 (14.2M weights; options width, up)",
    task="segmentation",
)
def unet_resnet18(in_channels=1, num_classes=2, image_size=128, width=64, up="transpose"):
    """ResNet-18-encoder U-Net; ``image_size`` is ignored (any size works)."""
    return ResNet18UNet(in_channels, num_classes, width=width, up=up)
