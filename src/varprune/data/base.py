"""What every data family shares: the dataset description, the in-memory splits, a file search result,
and the rules every reader follows when it opens a file.

A data family (vision.py: torchvision layouts; folders.py: image folders; segmentation readers; text.py)
reads its files into :class:`ImageData` (or its own splits) and describes the set with a
:class:`DatasetInfo`; registry.py maps names to families.

File rules, one for every reader:

* a name that looks like data (an image, a volume, a text file of the layout) must be a regular file
  (a symbolic link to one is fine): a FIFO, socket or device is refused from its ``stat`` alone, never
  opened, since opening a FIFO blocks until someone writes to it (:func:`data_file`, :func:`refuse_special`);
* images are opened by :func:`open_image` only: Pillow's decompression-bomb limit refused with the file and
  its size, every decoding error one line;
* text files are read by :func:`read_text`: UTF-8, a leading byte-order mark dropped.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from varprune.errors import DatasetError

__all__ = [
    "DatasetError",
    "DatasetInfo",
    "DatasetLocation",
    "ImageData",
    "data_file",
    "gib",
    "open_image",
    "read_text",
    "refuse_special",
    "resize_images",
]


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


def gib(n: float) -> str:
    """A size in bytes as the data readers' messages say it: "1.50 GiB"."""
    return f"{n / 2**30:.2f} GiB"


def file_kind(mode: int) -> str:
    """What a ``stat`` mode that is not a regular file is, in words ("a FIFO", "a folder", ...)."""
    for test, what in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def special_file(path: Path) -> str | None:
    """``"a FIFO"``, ``"a folder"``... when ``path`` exists but is not a regular file (links followed: a link to
    a data file is fine); None when it is a regular file or does not exist. Only ``stat``: nothing is opened."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


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


# ------------------------------------------------------------------ opening files


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def refuse_special(path: str | os.PathLike, what: str = "data file") -> None:
    """DatasetError for ``path``, named like a ``what`` but not a regular file: one line with the fix."""
    try:
        kind = _special_kind(os.stat(path).st_mode)
    except OSError as e:
        raise DatasetError(f"cannot read {what} {path} ({e.strerror or e}); restore or remove it") from None
    raise DatasetError(f"{path} is {kind}, not a regular file; replace it with the {what} or remove it")


def data_file(path: str | os.PathLike, what: str = "data file") -> bool:
    """Whether ``path`` is there as a regular file (symbolic links followed): False when absent or a folder,
    DatasetError when it is a FIFO, socket or device (known from ``stat``; the file is never opened)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise DatasetError(f"cannot read {what} {path} ({e.strerror or e}); restore or remove it") from None
    if stat.S_ISREG(mode):
        return True
    if stat.S_ISDIR(mode):
        return False
    refuse_special(path, what)
    return False  # not reached


def read_text(path: str | os.PathLike, fix: str = "re-fetch the dataset") -> str:
    """A text file of a dataset, UTF-8; a leading byte-order mark (Windows editors write one) is dropped.
    A missing, unreadable, special or undecodable file: DatasetError naming it, ending with ``fix``."""
    if not data_file(path, "text file"):
        raise DatasetError(f"cannot read {path} (not found); {fix}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); {fix}") from None


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e).strip()
    return ((text.splitlines() or [""])[0] or type(e).__name__)[:100]


@contextlib.contextmanager
def open_image(
    path: str | os.PathLike, what: str = "image", verb: str = "read", fix: str = "replace or remove the file"
) -> Iterator:
    """``with open_image(path) as im:`` a Pillow image, the one way every reader opens images.

    A path that is not a regular file is refused unopened; an image Pillow refuses as a decompression bomb
    (over twice ``PIL.Image.MAX_IMAGE_PIXELS``) is refused naming the file and its pixel count;
    any decoding error, at opening or inside the ``with`` block (truncation surfaces on loading), becomes
    ``cannot {verb} {what} PATH (reason); {fix}``. A DatasetError raised in the block passes unchanged.
    """
    from PIL import Image

    if not data_file(path, what):
        raise DatasetError(f"cannot {verb} {what} {path} ({'a folder' if os.path.isdir(path) else 'not found'}); {fix}")
    try:
        with Image.open(path) as im:
            yield im
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow says "Image size (N pixels) exceeds limit of M pixels, ..."
        found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
        size = f"{int(found[1]):,} pixels" if found else "too many pixels"
        limit = f" (Pillow's limit against decompression bombs: {int(found[2]):,})" if found else ""
        raise DatasetError(
            f"{what} {path} is {size}, too large to decode safely{limit}; shrink the image or remove it"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DatasetError(f"cannot {verb} {what} {path} ({_reason(e)}); {fix}") from None
