"""What every data family shares: the dataset description, the in-memory splits, a file search result.

A data family (vision.py: torchvision layouts; folders.py: image folders; segmentation readers; text.py)
reads its files into :class:`ImageData` (or its own splits) and describes the set with a
:class:`DatasetInfo`; registry.py maps names to families. Nothing here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from varprune.errors import DatasetError

__all__ = ["DatasetError", "DatasetInfo", "DatasetLocation", "ImageData", "resize_images"]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pad: int  # random-crop padding used for training
    flip: bool  # horizontal flips (wrong for digits)
    layout: str  # how the files sit on disk, for error messages
    task: str = "classification"  # which tasks.Task reads it
    class_names: tuple[str, ...] = ()  # filled in by readers that know them


@dataclass
class ImageData:
    """Whole splits as uint8 NCHW images and int64 labels, on the CPU."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


@dataclass
class DatasetLocation:
    """Where a dataset's files are, without reading them (``varprune doctor``, validation)."""

    name: str
    root: Path
    found: list[Path]
    missing: list[str]
    message: str | None = None  # what to tell the user when something is missing

    @property
    def complete(self) -> bool:
        return not self.missing

    def not_found_message(self) -> str:
        if self.message is not None:
            return self.message
        return self.missing[0] if self.missing else f"{self.name} not found in {self.root}"


def resize_images(x: torch.Tensor, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """(N, C, h, w) images in 0..255 (uint8 or float) -> uint8 (N, C, H, W), bilinear, antialiased
    when shrinking (PIL's BILINEAR resize to within rounding), ``chunk`` images at a time."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size and x.dtype == torch.uint8:
        return x
    from varprune.device import available_memory

    need = x.shape[0] * x.shape[1] * size[0] * size[1]
    free = available_memory("cpu")
    if free and need > 0.9 * free:
        raise DatasetError(
            f"{x.shape[0]} images at {size[0]}x{size[1]} px need {need / 2**30:.1f} GiB, but "
            f"{free / 2**30:.1f} GiB of memory is free: use a smaller --image-size"
        )
    out = torch.empty((x.shape[0], x.shape[1], *size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        part = x[i : i + chunk].float()
        if tuple(part.shape[-2:]) != size:
            part = F.interpolate(part, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[i : i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out
