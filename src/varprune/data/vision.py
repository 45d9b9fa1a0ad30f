"""Classification sets in torchvision's on-disk layouts: MNIST, Fashion-MNIST (IDX), CIFAR-10/100, SVHN.

Readers are strict: a file with the wrong IDX magic, a short read or a CIFAR
batch of the wrong layout raises :class:`DatasetError` with one clear line.
CIFAR's pickles go through an allow-list unpickler. Nothing is downloaded
unless ``download=True`` and the files are incomplete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import math
import os
import pickle
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from varprune.data.base import DatasetError, DatasetInfo, DatasetLocation, ImageData, resize_images, special_file

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

DATASETS = {  # the family's registry lines
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        1,
        28,
        10,
        (0.2860,),
        (0.3530,),
        2,
        True,
        "train-images-idx3-ubyte[.gz] etc. in DIR, DIR/raw or DIR/FashionMNIST/raw",
    ),
    "mnist": DatasetInfo(
        "mnist",
        1,
        28,
        10,
        (0.1307,),
        (0.3081,),
        2,
        False,
        "train-images-idx3-ubyte[.gz] etc. in DIR, DIR/raw or DIR/MNIST/raw",
    ),
    "cifar10": DatasetInfo(
        "cifar10",
        3,
        32,
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        4,
        True,
        "DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}",
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        3,
        32,
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        4,
        True,
        "DIR/cifar-100-python/{train,test}",
    ),
    "svhn": DatasetInfo(
        "svhn",
        3,
        32,
        10,
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        4,
        False,
        "DIR/train_32x32.mat and DIR/test_32x32.mat",
    ),
}

_TORCHVISION_DIR = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def default_dir(name: str) -> str:
    if name == "fashion-mnist":  # $VARPRUNE_FMNIST: a copy elsewhere (e.g. carried to a machine without it)
        return os.environ.get("VARPRUNE_FMNIST", DEBIAN_FASHION_MNIST)
    return os.environ.get("VARPRUNE_DATA", "data")


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, ValueError, zlib.error) as e:
        reason = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0][:80]
        raise DatasetError(f"cannot read {path} ({reason}); re-fetch the file") from None
    return raw


def parse_idx(raw: bytes, what: str = "IDX data") -> np.ndarray:
    """Parse an IDX file (the MNIST family's format): uint8 data, 1 to 3 dims."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        raise DatasetError(f"{what} is not a uint8 IDX file (wrong magic number); re-fetch the file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{what} is truncated (short header); re-fetch the file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise DatasetError(f"{what} has {len(raw)} bytes, its header promises {expected}; re-fetch the file")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    return parse_idx(_read_bytes(path), str(path))


def _find_idx(root: Path, name: str, stem: str) -> Path | None:
    for folder in (root, root / "raw", root / _TORCHVISION_DIR[name] / "raw"):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_idx_dataset(info: DatasetInfo, root: Path, splits=("train", "test")):
    arrays: dict[str, np.ndarray] = {
        "testx": np.zeros((0, info.size, info.size), np.uint8),
        "testy": np.zeros(0, np.int64),
    }
    for split, prefix in (("train", "train"), ("test", "t10k")):
        if split not in splits:
            continue
        for kind, stem in (("x", f"{prefix}-images-idx3-ubyte"), ("y", f"{prefix}-labels-idx1-ubyte")):
            path = _find_idx(root, info.name, stem)
            if path is None:
                raise FileNotFoundError(stem)
            arrays[split + kind] = read_idx(path)
    for split in splits:
        x, y = arrays[split + "x"], arrays[split + "y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.shape[1:] != (info.size, info.size):
            raise DatasetError(f"{info.name} {split} files disagree: images {x.shape}, labels {y.shape}; re-fetch them")
        if y.size and y.max() >= info.num_classes:
            raise DatasetError(f"{info.name} {split} labels exceed {info.num_classes - 1}; re-fetch the files")
    return (arrays["trainx"][:, None], arrays["trainy"], arrays["testx"][:, None], arrays["testy"])


class _CifarUnpickler(pickle.Unpickler):
    """Loads CIFAR's python pickles without executing arbitrary code: only the
    numpy classes those files contain may be constructed."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def parse_cifar_batch(raw: bytes, what: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # any malformed pickle: one clear line
        raise DatasetError(f"{what} is not a CIFAR python batch ({type(e).__name__}); re-fetch the file") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DatasetError(f"{what} lacks the CIFAR keys b'data' and {label_key!r}; re-fetch the file")
    data, labels = batch[b"data"], batch[label_key]
    try:
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError, RecursionError, MemoryError):
        raise DatasetError(f"{what} holds data of the wrong type; re-fetch the file") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise DatasetError(
            f"{what} has data {data.shape} and labels {labels.shape}, expected (N, 3072) and (N,); re-fetch the file"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_layout(info: DatasetInfo) -> tuple[str, bytes, dict[str, list[str]]]:
    if info.name == "cifar10":
        return (
            "cifar-10-batches-py",
            b"labels",
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        )
    return "cifar-100-python", b"fine_labels", {"train": ["train"], "test": ["test"]}


def _load_cifar(info: DatasetInfo, root: Path, splits=("train", "test")):
    folder, key, files = _cifar_layout(info)
    base = root / folder if (root / folder).is_dir() else root
    out = []
    for split in ("train", "test"):
        xs, ys = [np.zeros((0, 3, 32, 32), np.uint8)], [np.zeros(0, np.int64)]
        for fname in files[split] if split in splits else ():
            path = base / fname
            if not path.is_file():
                raise FileNotFoundError(fname)
            x, y = parse_cifar_batch(_read_bytes(path), str(path), key)
            if y.size and (y.min() < 0 or y.max() >= info.num_classes):
                raise DatasetError(f"{path} has labels outside 0..{info.num_classes - 1}; re-fetch the file")
            xs.append(x)
            ys.append(y)
        out += [np.concatenate(xs), np.concatenate(ys)]
    return tuple(out)


def _load_svhn(info: DatasetInfo, root: Path, splits=("train", "test")):
    out = []
    for split in ("train", "test"):
        if split not in splits:
            out += [np.zeros((0, 3, 32, 32), np.uint8), np.zeros(0, np.int64)]
            continue
        path = root / f"{split}_32x32.mat"
        if not path.is_file():
            raise FileNotFoundError(path.name)
        try:
            from scipy.io import loadmat

            mat = loadmat(str(path))
            x = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1))
            y = np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10  # SVHN stores digit 0 as label 10
        except ImportError:
            raise DatasetError("reading SVHN needs scipy: pip install scipy") from None
        except Exception as e:
            raise DatasetError(f"{path} is not an SVHN .mat file ({type(e).__name__}); re-fetch it") from None
        if x.shape[1:] != (3, 32, 32) or len(x) != len(y):
            raise DatasetError(f"{path} holds images {x.shape} and labels {y.shape}; re-fetch it")
        out += [x, y]
    return tuple(out)


_READERS = {
    "fashion-mnist": _load_idx_dataset,
    "mnist": _load_idx_dataset,
    "cifar10": _load_cifar,
    "cifar100": _load_cifar,
    "svhn": _load_svhn,
}


def _download(info: DatasetInfo, root: Path) -> None:
    import torchvision.datasets as tvd

    if info.name == "svhn":
        for split in ("train", "test"):
            tvd.SVHN(str(root), split=split, download=True)
        return
    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[
        info.name
    ]
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _new_paths(info: DatasetInfo, root: Path) -> Callable[[], list[Path]]:
    """Before a download: a function that lists what the attempt has created since, to remove it on failure.
    That is the topmost folder of ``root`` that did not exist, or else the new entries of ``root`` and of the
    folders torchvision writes into (``<Name>/``, ``<Name>/raw/``): never anything that was there before."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    if missing:
        return lambda: [missing[-1]]
    watched = [root] + (
        [root / _TORCHVISION_DIR[info.name], root / _TORCHVISION_DIR[info.name] / "raw"]
        if info.name in _TORCHVISION_DIR
        else []
    )

    def entries() -> set[Path]:
        return {p for folder in watched if folder.is_dir() for p in folder.iterdir()}

    before = entries()
    return lambda: sorted(entries() - before)


def _remove_new(made: Callable[[], list[Path]]) -> None:
    """Remove what a failed download created (best effort: a leftover is no reason to hide the failure)."""
    with contextlib.suppress(OSError):
        for path in made():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()


def locate(name: str, root: Path, need_test: bool = True) -> DatasetLocation:
    """Which of ``name``'s files exist under ``root``; the test files only if ``need_test``."""
    info = DATASETS[name]
    found: list[Path] = []
    missing: list[str] = []
    try:
        if info.name in _TORCHVISION_DIR:
            for stem in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )[: 4 if need_test else 2]:
                path = _find_idx(root, info.name, stem)
                (found.append(path) if path is not None else missing.append(stem))
        elif info.name in ("cifar10", "cifar100"):
            folder, _, splits = _cifar_layout(info)
            base = root / folder if (root / folder).is_dir() else root
            for fname in splits["train"] + (splits["test"] if need_test else []):
                (found.append(base / fname) if (base / fname).is_file() else missing.append(fname))
        else:
            for split in ("train", "test")[: 2 if need_test else 1]:
                path = root / f"{split}_32x32.mat"
                (found.append(path) if path.is_file() else missing.append(path.name))
    except OSError as e:  # an unreadable folder: nothing found there
        found, missing = [], [f"{root} ({e.strerror or e})"]
    message = _not_found(name, root, missing[0]) if missing else None
    odd = next(((p, k) for p in _candidates(info.name, root, missing) if (k := special_file(p))), None)
    if odd is not None:  # a file of the right name that is a FIFO, device or folder: say so, not "not found"
        message = f"{odd[0]} is {odd[1]}, not a regular file; put the dataset's file itself there"
    return DatasetLocation(name, root, found, missing, message)


def _candidates(name: str, root: Path, missing: list[str]) -> list[Path]:
    """Where the missing files would have been looked for."""
    if name in _TORCHVISION_DIR:
        folders = (root, root / "raw", root / _TORCHVISION_DIR[name] / "raw")
        return [f / n for stem in missing for f in folders for n in (stem, f"{stem}.gz")]
    if name in ("cifar10", "cifar100"):
        folder = _cifar_layout(DATASETS[name])[0]
        return [b / m for m in missing for b in (root, root / folder)]
    return [root / m for m in missing]


def _not_found(name: str, root: Path, missing: str) -> str:
    hint = "pass --download to fetch it"
    if name == "fashion-mnist":
        hint = "install it with `apt-get install dataset-fashion-mnist`, or " + hint
    return (
        f"{name} not found in {root} (missing {missing}; expected {DATASETS[name].layout}): {hint}, "
        f"or point --data-dir at it"
    )


def _resized(data: ImageData, size: int | None) -> ImageData:
    """A classification set at ``size`` px (None or its own size: unchanged); the random-crop
    padding scales with it."""
    info = data.info
    if size is None or size == info.size:
        return data
    info = dataclasses.replace(info, size=size, crop_pad=round(info.crop_pad * size / info.size))
    return ImageData(
        info,
        resize_images(data.train_x, (size, size)),
        data.train_y,
        resize_images(data.test_x, (size, size)),
        data.test_y,
        f"{data.source} (resized to {size} px)",
    )


def load(
    name: str, root: Path, download: bool = False, image_size: int | None = None, need_test: bool = True
) -> ImageData:
    """The whole set as uint8 tensors; ``need_test=False`` reads the training files only (the test split comes
    back empty). ``download``: fetch the files with torchvision unless they are all there already; a failed
    download removes what it created and raises DatasetError."""
    info = DATASETS[name]
    if download and not locate(name, root, need_test).complete:  # complete files are used as they are
        made = _new_paths(info, root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            _download(info, root)
        except Exception as e:  # network, disk or torchvision trouble: one line, not a traceback
            _remove_new(made)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise DatasetError(
                f"downloading {name} into {root} failed ({reason}); fetch the files by hand "
                f"({info.layout}) and point --data-dir at them"
            ) from None
    try:
        tx, ty, vx, vy = _READERS[name](info, root, ("train", "test") if need_test else ("train",))
    except FileNotFoundError as e:
        raise DatasetError(_not_found(name, root, e.args[0] if e.args else str(e))) from None
    data = ImageData(
        info,
        _tensor(tx, torch.uint8),
        _tensor(ty, torch.int64),
        _tensor(vx, torch.uint8),
        _tensor(vy, torch.int64),
        str(root),
    )
    return _resized(data, image_size)


def _tensor(a, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True)).to(dtype)
