"""Bring your own images: torchvision's ImageFolder layout and Tiny ImageNet.

Readers return :class:`FolderImageData`, an :class:`varprune.data.ImageData`
(uint8 NCHW images, int64 labels, a DatasetInfo with per-channel mean/std
measured on the training split) plus the class folder names and readable
class names, so it feeds :class:`varprune.data.DeviceLoader` as is.

Layouts
    imagefolder     DIR/train/<class>/**/<image> and DIR/val/<class>/... (or
                    DIR/test/<class>/... when there is no val/). Classes are
                    the train sub-folder names, sorted; label i is the i-th.
                    Files with other suffixes than IMAGE_EXTENSIONS and hidden
                    files/folders are skipped (as torchvision does).
    tiny-imagenet   DIR/wnids.txt (one class id a line: the class count and
                    order), DIR/train/<wnid>/images/*.JPEG,
                    DIR/val/images/* labelled by DIR/val/val_annotations.txt,
                    DIR/words.txt (optional) for names. 64 px.

Decoding (Pillow)
    Colour: every image converted to RGB (alpha dropped, palette and CMYK converted) unless *every* image
    of both splits is greyscale (modes 1, L, LA, I, I;16, F), then all are kept as one channel (L). So
    MNIST-like folders give 1-channel data and one stray colour image makes all RGB.
    Size: shorter side resized to ``image_size`` (bilinear, antialiased as Pillow does when shrinking),
    then the centre ``image_size`` square cropped: torchvision's ``Resize(s) + CenterCrop(s)``. JPEGs are
    decoded with Pillow's draft mode at the smallest power-of-two reduction that is still at least
    ``image_size`` (much faster on large photos).
    Errors: an unreadable, truncated or too large image (base.open_image), a FIFO, socket or device named
    like an image or a text file of the layout (refused by the listing, never opened), an empty class
    folder, fewer than two classes, val classes not in train, a missing train or val folder: DatasetError
    with one line naming the path. Nothing is ever downloaded.

Cache
    Decoding is slow, so the decoded arrays are kept in ``$VARPRUNE_CACHE`` (else
    ``$XDG_CACHE_HOME/varprune``, else ``~/.cache/varprune``) as ``<reader>-<key>.safetensors``, key =
    SHA-256 of (reader, resolved root, every file's relative path, size and mtime, image_size,
    FORMAT_VERSION). Any change to a file or the settings makes a new key; stale files are never read and
    may be deleted at any time (the folder is safe to remove). Written atomically; no pickle.

Too big for the device
    :func:`estimate_bytes` and :func:`fits_on_device` say whether a decoded set fits; if not,
    :class:`StreamingLoader` decodes from the files in DataLoader workers and crops/flips/normalises on
    the host, with the iteration interface of DeviceLoader.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from varprune.data.base import (
    DatasetError,
    DatasetInfo,
    DatasetLocation,
    ImageData,
    open_image,
)
from varprune.data.imagelist import (  # the listing: re-exported, as readers and tests import it from here
    FORMAT_VERSION,
    IMAGEFOLDER_LAYOUT,
    TINY_LAYOUT,
    FileList,
    scan_imagefolder,
    scan_tiny_imagenet,
)

CACHE_FORMAT = f"varprune-decoded-{FORMAT_VERSION}"
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_CHUNK = 64  # images per decoding task


@dataclass
class FolderImageData(ImageData):
    """ImageData plus class folder names (``classes``) and readable ``class_names``."""

    classes: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    from_cache: bool = False


# ----------------------------------------------------------------- decoding


def decode_image(path: str | os.PathLike, image_size: int, mode: str | None = None) -> tuple[np.ndarray, bool]:
    """Decode one image: ``(uint8 array (S, S) for grey or (S, S, 3), was_grey)``.

    ``mode`` forces "L" or "RGB"; None keeps greyscale images grey and turns
    the rest into RGB. Shorter side resized to ``image_size``, centre crop.
    """
    from PIL import Image

    with open_image(path, verb="decode") as im:  # one rule for every reader: special files, huge images
        gray = im.mode in GRAY_MODES
        target = mode or ("L" if gray else "RGB")
        if im.format == "JPEG":
            im.draft(target, (image_size, image_size))
        pixels: Image.Image = im.convert(target)  # loads the pixels: truncation and decoder errors surface here
    w, h = pixels.size
    if min(w, h) != image_size:
        # torchvision's rule: the longer side is truncated, int(s * long / short)
        new = (image_size, int(image_size * h / w)) if w <= h else (int(image_size * w / h), image_size)
        pixels = pixels.resize(new, Image.Resampling.BILINEAR)
        w, h = new
    left, top = round((w - image_size) / 2.0), round((h - image_size) / 2.0)
    if (w, h) != (image_size, image_size):
        pixels = pixels.crop((left, top, left + image_size, top + image_size))
    return np.asarray(pixels, dtype=np.uint8), gray


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not sys.stderr.isatty(), leave=False)


def default_workers() -> int:
    """Threads (decoding) or processes (streaming) to use: CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_files(
    files: Sequence[Path], image_size: int, workers: int | None = None, desc: str = "decoding"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``files`` in threads: ``(uint8 (N, 3, S, S), bool (N,) was_grey)``; grey images fill all 3 planes."""
    n = len(files)
    out = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    gray = np.zeros(n, dtype=bool)
    lock = threading.Lock()
    with _progress(n, desc) as bar:

        def work(start: int) -> None:
            for i in range(start, min(start + _CHUNK, n)):
                a, g = decode_image(files[i], image_size)
                out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
                gray[i] = g
            with lock:
                bar.update(min(_CHUNK, n - start))

        workers = workers or default_workers()
        if workers <= 1:
            for start in range(0, n, _CHUNK):
                work(start)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(work, range(0, n, _CHUNK)))  # list(): re-raises the first DatasetError
    return out, gray


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NCHW images, scaled to [0, 1] (float64, in chunks)."""
    c = x.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(x), 1024):
        chunk = x[start : start + 1024].double().div_(255.0)
        s1 += chunk.sum((0, 2, 3))
        s2 += chunk.square().sum((0, 2, 3))
    count = max(1, x.shape[0] * x.shape[2] * x.shape[3])
    mean = s1 / count
    std = (s2 / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)  # a constant channel: no divide by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def _info(listing: FileList, channels: int, image_size: int, mean, std) -> DatasetInfo:
    layout = TINY_LAYOUT if listing.reader == "tiny-imagenet" else IMAGEFOLDER_LAYOUT
    return DatasetInfo(
        listing.reader,
        channels,
        image_size,
        len(listing.classes),
        tuple(mean),
        tuple(std),
        max(1, image_size // 8),
        True,
        layout,
    )


# ----------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$VARPRUNE_CACHE``, else ``$XDG_CACHE_HOME/varprune``, else ``~/.cache/varprune``."""
    if os.environ.get("VARPRUNE_CACHE"):
        return Path(os.environ["VARPRUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "varprune"


def _cache_path(cache, listing: FileList, key: str) -> Path:
    folder = default_cache_dir() if cache is True else Path(cache)
    return folder / f"{listing.reader}-{key[:32]}.safetensors"


def _read_cache(path: Path, listing: FileList, image_size: int, key: str) -> FolderImageData | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in ("train_x", "train_y", "test_x", "test_y")}
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            return None
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError):
        return None  # absent, torn or foreign: decode again and overwrite
    tx, ty, vx, vy = (tensors[k] for k in ("train_x", "train_y", "test_x", "test_y"))
    if (
        tx.dtype != torch.uint8
        or vx.dtype != torch.uint8
        or len(tx) != len(listing.train_files)
        or len(vx) != len(listing.test_files)
        or tx.shape[2:] != (image_size, image_size)
    ):
        return None
    info = _info(listing, tx.shape[1], image_size, mean, std)
    return FolderImageData(
        info, tx, ty, vx, vy, str(listing.root), list(listing.classes), list(listing.class_names), True
    )


def _write_cache(path: Path, data: FolderImageData, key: str) -> None:
    from safetensors.torch import save as st_save

    from varprune.storage.files import atomic_write_bytes

    meta = {
        "format": CACHE_FORMAT,
        "key": key,
        "root": data.source,
        "mean": json.dumps(data.info.mean),
        "std": json.dumps(data.info.std),
        "classes": json.dumps(data.classes),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "train_x": data.train_x.contiguous(),
            "train_y": data.train_y.contiguous(),
            "test_x": data.test_x.contiguous(),
            "test_y": data.test_y.contiguous(),
        }
        atomic_write_bytes(path, st_save(tensors, metadata=meta))
    except OSError as e:
        warnings.warn(
            f"could not cache decoded images in {path.parent} ({e.strerror or e}); "
            f"set VARPRUNE_CACHE to a writable folder to avoid decoding again",
            stacklevel=3,
        )


def read_listing(
    listing: FileList, image_size: int, cache: bool | str | os.PathLike = True, workers: int | None = None
) -> FolderImageData:
    """Decode a :class:`FileList` (or read it back from the cache). ``cache``: True (default
    folder), False (no cache) or a folder."""
    image_size = int(image_size)
    if image_size < 1:
        raise DatasetError(f"image size must be >= 1, got {image_size}")
    use_cache = cache is not False and cache is not None
    key = listing.cache_key(image_size) if use_cache else ""  # one stat() of every file
    path = _cache_path(cache, listing, key) if use_cache else None
    if path is not None and path.is_file():
        hit = _read_cache(path, listing, image_size, key)
        if hit is not None:
            return hit
    files = listing.train_files + listing.test_files
    x, gray = decode_files(files, image_size, workers, desc=f"decoding {listing.reader}")
    if gray.all():
        x = np.ascontiguousarray(x[:, :1])
    n = len(listing.train_files)
    tx, vx = torch.from_numpy(x[:n]), torch.from_numpy(x[n:])
    mean, std = channel_stats(tx)
    data = FolderImageData(
        _info(listing, x.shape[1], image_size, mean, std),
        tx,
        torch.tensor(listing.train_labels, dtype=torch.int64),
        vx,
        torch.tensor(listing.test_labels, dtype=torch.int64),
        str(listing.root),
        list(listing.classes),
        list(listing.class_names),
        False,
    )
    if path is not None:
        _write_cache(path, data, key)
    return data


def read_imagefolder(
    root: str | os.PathLike, image_size: int = 32, cache: bool | str | os.PathLike = True, workers: int | None = None
) -> FolderImageData:
    """Read DIR/train/<class>/* and DIR/val/<class>/* (or test/) as uint8 ``image_size`` px squares.

    See the module docstring for colour, resizing, errors and the cache.
    """
    return read_listing(scan_imagefolder(root), image_size, cache, workers)


def read_tiny_imagenet(
    root: str | os.PathLike, cache: bool | str | os.PathLike = True, workers: int | None = None, image_size: int = 64
) -> FolderImageData:
    """Read Tiny ImageNet (200 classes, 64 px unless ``image_size``; the class count comes from wnids.txt).

    ``root`` is the folder holding wnids.txt, or its parent holding
    tiny-imagenet-200/. Labels: the wnids.txt order; ``class_names`` the first
    synonym in words.txt (the wnid when absent). Its test/ split has no
    labels and is not read: the val split is the test set.
    """
    return read_listing(scan_tiny_imagenet(root), image_size, cache, workers)


# ----------------------------------------------------------------- cheap checks


@dataclass
class FolderLocation(DatasetLocation):
    """DatasetLocation for the folder readers, with what the listing found; ``message`` holds the scanner's error."""

    num_classes: int = 0
    num_images: int = 0


def _locate(name: str, root, scan) -> FolderLocation:
    root = Path(root)
    try:
        listing = scan(root)
    except DatasetError as e:
        return FolderLocation(name, root, [], [str(e)], str(e))
    return FolderLocation(
        name,
        listing.root,
        [listing.root / "train", listing.root / listing.test_split],
        [],
        None,
        len(listing.classes),
        listing.num_images,
    )


def locate_imagefolder(root: str | os.PathLike) -> FolderLocation:
    """Whether ``root`` holds a usable ImageFolder tree: lists files, decodes nothing."""
    return _locate("imagefolder", root, scan_imagefolder)


def locate_tiny_imagenet(root: str | os.PathLike) -> FolderLocation:
    """Whether ``root`` holds Tiny ImageNet: lists files, decodes nothing."""
    return _locate("tiny-imagenet", root, scan_tiny_imagenet)


# ----------------------------------------------------------------- the family's registry lines

DATASETS = {  # shape and classes are read from the folder
    "imagefolder": DatasetInfo("imagefolder", 0, 0, 0, (), (), 4, True, IMAGEFOLDER_LAYOUT),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 3, 64, 200, (), (), 8, True, TINY_LAYOUT),
}
DEFAULT_SIZE = {"imagefolder": 32, "tiny-imagenet": 64}


def default_dir(name: str) -> str:
    return os.environ.get("VARPRUNE_DATA", "data")


def scan(name: str, root) -> FileList:
    """The folder's file list (reads no image)."""
    return (scan_imagefolder if name == "imagefolder" else scan_tiny_imagenet)(root)


def locate(name: str, root: Path, need_test: bool = True) -> DatasetLocation:
    return _locate(name, root, scan_imagefolder if name == "imagefolder" else scan_tiny_imagenet)


def load(
    name: str,
    root: Path,
    download: bool = False,
    image_size: int | None = None,
    need_test: bool = True,
    listing: FileList | None = None,
) -> ImageData:
    """The decoded folder (from the cache when it is there); ``listing``: a scan already made."""
    data = read_listing(listing or scan(name, root), image_size or DEFAULT_SIZE[name])
    info = dataclasses.replace(data.info, class_names=tuple(data.class_names))
    return ImageData(info, data.train_x, data.train_y, data.test_x, data.test_y, data.source)


def estimate_bytes(num_images: int, channels: int, image_size: int) -> int:
    """Bytes of a decoded set on the device: uint8 images plus int64 labels."""
    return int(num_images) * (int(channels) * int(image_size) ** 2 + 8)
