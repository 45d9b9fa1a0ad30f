"""Datasets in torchvision's on-disk layouts, and a loader that lives on the device.

Every supported dataset is small enough to hold whole on the accelerator as
uint8 (CIFAR-10 train: 150 MB), so the loader shuffles with ``randperm`` on the
device and crops, flips and normalises whole batches there: no worker
processes, no host-to-device copies and no host synchronisation per step.

Readers are strict: a file with the wrong IDX magic, a short read or a CIFAR
batch of the wrong layout raises :class:`DatasetError` with one clear line.
Nothing is downloaded unless ``download=True``.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


from .errors import DatasetError  # noqa: E402  (re-exported: readers raise it)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pad: int          # random-crop padding used for training
    flip: bool             # horizontal flips (wrong for digits)
    layout: str            # how the files sit on disk, for error messages
    task: str = "classification"        # which tasks.Task reads it
    class_names: tuple[str, ...] = ()   # filled in by readers that know them


DATASETS = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), 2, True,
                                 "train-images-idx3-ubyte[.gz] etc. in DIR, DIR/raw or DIR/FashionMNIST/raw"),
    "mnist": DatasetInfo("mnist", 1, 28, 10, (0.1307,), (0.3081,), 2, False,
                         "train-images-idx3-ubyte[.gz] etc. in DIR, DIR/raw or DIR/MNIST/raw"),
    "cifar10": DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True,
                           "DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}"),
    "cifar100": DatasetInfo("cifar100", 3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 4, True,
                            "DIR/cifar-100-python/{train,test}"),
    "svhn": DatasetInfo("svhn", 3, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 4, False,
                        "DIR/train_32x32.mat and DIR/test_32x32.mat"),
}

# Bring-your-own classification sets (folderdata.py): shape and classes are read from the folder.
DATASETS["imagefolder"] = DatasetInfo("imagefolder", 0, 0, 0, (), (), 4, True,
                                      "DIR/train/<class>/<images> and DIR/val/<class>/<images> (or test/)")
DATASETS["tiny-imagenet"] = DatasetInfo("tiny-imagenet", 3, 64, 200, (), (), 8, True,
                                        "DIR/wnids.txt, DIR/train/<wnid>/images/*.JPEG, DIR/val/images/* with "
                                        "DIR/val/val_annotations.txt")
FOLDER_SETS = ("imagefolder", "tiny-imagenet")

# Segmentation sets (segdata.py): shape and classes are read from the data, so these are placeholders that
# load_dataset fills in. Crops shift image and mask together (tasks.crop_flip).
for _name, _layout in (("msd", "DIR/dataset.json, DIR/imagesTr/*.nii.gz, DIR/labelsTr/*.nii.gz (MSD / nnU-Net)"),
                       ("seg-folder", "DIR/images/*.png|jpg and DIR/masks/*.png (or DIR/train/... and DIR/test/...)"),
                       ("colin27", "ch2.nii.gz, aal.nii.gz, aal.nii.txt (Debian package mricron-data)")):
    DATASETS[_name] = DatasetInfo(_name, 0, 0, 0, (), (), 4 if _name == "colin27" else 8, True, _layout,
                                  task="segmentation")

_TORCHVISION_DIR = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    return DATASETS[name]


def default_data_dir(name: str) -> str:
    if name == "fashion-mnist":   # $VARPRUNE_FMNIST: a copy elsewhere (e.g. carried to a machine without it)
        return os.environ.get("VARPRUNE_FMNIST", DEBIAN_FASHION_MNIST)
    if name == "colin27":
        from .segdata import DEBIAN_MRICRON
        return DEBIAN_MRICRON
    return os.environ.get("VARPRUNE_DATA", "data")


@dataclass
class ImageData:
    """Whole splits as uint8 NCHW images and int64 labels, on the CPU."""
    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


# ----------------------------------------------------------------- readers

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
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
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
    arrays = {"testx": np.zeros((0, info.size, info.size), np.uint8), "testy": np.zeros(0, np.int64)}
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

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

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
        raise DatasetError(f"{what} has data {data.shape} and labels {labels.shape}, "
                           f"expected (N, 3072) and (N,); re-fetch the file")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_layout(info: DatasetInfo) -> tuple[str, bytes, dict[str, list[str]]]:
    if info.name == "cifar10":
        return "cifar-10-batches-py", b"labels", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                                  "test": ["test_batch"]}
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


_READERS = {"fashion-mnist": _load_idx_dataset, "mnist": _load_idx_dataset,
            "cifar10": _load_cifar, "cifar100": _load_cifar, "svhn": _load_svhn}


def _download(info: DatasetInfo, root: Path) -> None:
    import torchvision.datasets as tvd
    if info.name == "svhn":
        for split in ("train", "test"):
            tvd.SVHN(str(root), split=split, download=True)
        return
    cls = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST,
           "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[info.name]
    for train in (True, False):
        cls(str(root), train=train, download=True)


@dataclass
class DatasetLocation:
    """Where a dataset's files are, without reading them (``varprune doctor``, validation)."""
    name: str
    root: Path
    found: list[Path]
    missing: list[str]

    @property
    def complete(self) -> bool:
        return not self.missing

    def not_found_message(self) -> str:
        if DATASETS[self.name].task == "segmentation":
            return self.missing[0] if self.missing else f"{self.name} not found in {self.root}"
        return _not_found(self.name, self.root, self.missing[0] if self.missing else "?")


def locate_dataset(name: str, data_dir: str | os.PathLike | None = None, need_test: bool = True) -> DatasetLocation:
    """Which of ``name``'s files exist under ``data_dir`` (or the default folder); the test files only if
    ``need_test`` (as :func:`load_dataset`)."""
    info = dataset_info(name)
    root = Path(data_dir if data_dir is not None else default_data_dir(name))
    found, missing = [], []
    if info.task == "segmentation":
        from .segdata import locate_segdata
        complete, message = locate_segdata(name, root)
        return DatasetLocation(name, root, [root] if complete else [], [] if complete else [message])
    if name in FOLDER_SETS:
        from .folderdata import locate_imagefolder, locate_tiny_imagenet
        return (locate_imagefolder if name == "imagefolder" else locate_tiny_imagenet)(root)
    try:
        if info.name in _TORCHVISION_DIR:
            for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")[:4 if need_test else 2]:
                path = _find_idx(root, info.name, stem)
                (found.append(path) if path is not None else missing.append(stem))
        elif info.name in ("cifar10", "cifar100"):
            folder, _, splits = _cifar_layout(info)
            base = root / folder if (root / folder).is_dir() else root
            for fname in splits["train"] + (splits["test"] if need_test else []):
                (found.append(base / fname) if (base / fname).is_file() else missing.append(fname))
        else:
            for split in ("train", "test")[:2 if need_test else 1]:
                path = root / f"{split}_32x32.mat"
                (found.append(path) if path.is_file() else missing.append(path.name))
    except OSError as e:  # an unreadable folder: nothing found there
        return DatasetLocation(name, root, [], [f"{root} ({e.strerror or e})"])
    return DatasetLocation(name, root, found, missing)


def _not_found(name: str, root: Path, missing: str) -> str:
    hint = "pass --download to fetch it"
    if name == "fashion-mnist":
        hint = "install it with `apt-get install dataset-fashion-mnist`, or " + hint
    return (f"{name} not found in {root} (missing {missing}; expected {DATASETS[name].layout}): {hint}, "
            f"or point --data-dir at it")


def resize_images(x: torch.Tensor, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """(N, C, h, w) images in 0..255 (uint8 or float) -> uint8 (N, C, H, W), bilinear, antialiased
    when shrinking (PIL's BILINEAR resize to within rounding), ``chunk`` images at a time."""
    size = tuple(size)
    if tuple(x.shape[-2:]) == size and x.dtype == torch.uint8:
        return x
    out = torch.empty((x.shape[0], x.shape[1], *size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].float()
        if tuple(part.shape[-2:]) != size:
            part = F.interpolate(part, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[i:i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _resized(data: ImageData, size: int | None) -> ImageData:
    """A classification set at ``size`` px (None or its own size: unchanged); the random-crop
    padding scales with it."""
    info = data.info
    if size is None or size == info.size:
        return data
    info = dataclasses.replace(info, size=size, crop_pad=round(info.crop_pad * size / info.size))
    return ImageData(info, resize_images(data.train_x, (size, size)), data.train_y,
                     resize_images(data.test_x, (size, size)), data.test_y, f"{data.source} (resized to {size} px)")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
                 image_size: int | None = None, need_test: bool = True) -> ImageData:
    """Load a whole dataset as uint8 tensors, from torchvision's on-disk layout.

    Without ``data_dir``, Fashion-MNIST is read from the Debian package
    ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist) and the
    others from ``$VARPRUNE_DATA`` or ``./data``. ``need_test=False`` reads
    the training files only (the test split comes back empty) for the
    MNIST/CIFAR/SVHN layouts; the folder and segmentation sets read theirs.
    """
    info = dataset_info(name)
    root = Path(data_dir if data_dir is not None else default_data_dir(name))
    if info.task == "segmentation":
        return _load_segmentation(info, root, image_size)
    if name in FOLDER_SETS:
        from .folderdata import read_imagefolder, read_tiny_imagenet
        if name == "imagefolder":
            data = read_imagefolder(root, image_size or 32)
        else:
            data = read_tiny_imagenet(root, image_size=image_size or 64)
        info = dataclasses.replace(data.info, class_names=tuple(data.class_names))
        return ImageData(info, data.train_x, data.train_y, data.test_x, data.test_y, data.source)
    if download:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _download(info, root)
        except Exception as e:  # network, disk or torchvision trouble: one line, not a traceback
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise DatasetError(f"downloading {name} into {root} failed ({reason}); fetch the files by hand "
                               f"({info.layout}) and point --data-dir at them") from None
    try:
        tx, ty, vx, vy = _READERS[name](info, root, ("train", "test") if need_test else ("train",))
    except FileNotFoundError as e:
        raise DatasetError(_not_found(name, root, e.args[0] if e.args else str(e))) from None
    to = lambda a, dt: torch.from_numpy(np.array(a, copy=True)).to(dt)  # noqa: E731
    data = ImageData(info, to(tx, torch.uint8), to(ty, torch.int64), to(vx, torch.uint8), to(vy, torch.int64), str(root))
    return _resized(data, image_size)


def _load_segmentation(info: DatasetInfo, root: Path, image_size: int | None = None) -> ImageData:
    """A segmentation set as ImageData: images uint8 (N, C, H, W), label maps int64 (N, H, W)."""
    from .segdata import load_segdata
    if not root.exists():
        raise DatasetError(f"{info.name} not found: {root} does not exist (expected {info.layout}); "
                           f"point --data-dir at it")
    seg = load_segdata(info.name, root, **({"size": (image_size, image_size)} if image_size else {}))
    h, w = seg.size
    if h != w:
        raise DatasetError(f"{info.name} slices are {h}x{w}; varprune's models take square inputs")
    resolved = dataclasses.replace(info, channels=seg.channels, size=h, num_classes=seg.num_classes,
                                   mean=tuple(seg.mean), std=tuple(max(s, 1e-3) for s in seg.std),
                                   class_names=tuple(seg.class_names))
    return ImageData(resolved, seg.train_x, seg.train_y, seg.test_x, seg.test_y, seg.source)


def subset(x: torch.Tensor, y: torch.Tensor, limit: int | None, salt: int = 0):
    """A deterministic subset of ``limit`` examples (the same for every seed)."""
    if limit is None or limit >= len(x):
        return x, y
    g = torch.Generator().manual_seed(1234 + salt)
    idx = torch.randperm(len(x), generator=g)[:limit].sort().values
    return x[idx], y[idx]


VALIDATION_SEED = 4321


def validation_indices(n: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (training, validation) indices of a fixed random split of ``n`` training examples.

    ``round(n * fraction)`` examples (at least 1, leaving at least 2) go to
    validation; the draw uses its own seed (not the run's), so every run and
    every seed of a tuning sees the same split.
    """
    if n < 3:
        raise DatasetError(f"{n} training example(s) cannot be split into training and validation")
    n_val = min(n - 2, max(1, round(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return order[n_val:].sort().values, order[:n_val].sort().values


# ------------------------------------------------------------ device loader

class DeviceLoader:
    """Batches from uint8 tensors held on ``device``; augmentation on the device.

    ``labels`` are class indices (N,) or label maps (N, H, W). ``augment`` is
    a task's ``augment(x, y, generator)`` (it applies one random draw to an
    image and its mask alike), or None. Each epoch visits every example once;
    in training, a last batch of a single example is dropped (BatchNorm cannot
    normalise one example; shuffling shows it in other epochs). Shuffling and
    augmentation draw from one ``torch.Generator`` seeded by ``seed``; its
    state is ``loader.generator.get_state()`` and is what a checkpoint saves
    so a resumed run sees the same batches.

    Data parallel (``rank`` of ``world`` processes, see distributed.py):
    ``batch_size`` is the global batch. Every process draws the same
    permutation and the same augmentation of the whole global batch (so the
    generator stays in step and the images are those of one process), then
    keeps its contiguous share; shares differ by at most one example and
    :meth:`loss_weight` makes their mean gradients average to the global
    batch's mean. A last batch that would leave some process fewer than 2
    examples is dropped (with one process: a last batch of 1, as above).
    Evaluation loaders iterate over the process's contiguous share of the set.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, batch_size: int,
                 train: bool, device="cpu", seed: int = 0, augment=None,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, rank: int = 0, world: int = 1):
        self.rank, self.world = int(rank), int(world)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = int(batch_size)
        self.train = train
        self.augment = augment if train else None
        self.info = info
        self.channels_last = channels_last
        self.dtype = dtype
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        std = torch.tensor(info.std, device=self.device)
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(info.mean, device=self.device) / std).view(1, -1, 1, 1)

    @property
    def num_examples(self) -> int:
        return len(self.images)

    def _stops(self) -> int:
        n = len(self.images)
        last = n % self.batch_size
        if self.train and n > 1 and 0 < last < 2 * self.world:
            return n - last
        return n

    def _span(self) -> tuple[int, int]:
        """The examples this loader visits in an epoch: all for training (sharded per batch), a share for tests."""
        return (0, self._stops()) if self.train else share(self._stops(), self.rank, self.world)

    def __len__(self) -> int:
        lo, hi = self._span()
        return -(-(hi - lo) // self.batch_size)

    def loss_weight(self, step: int) -> float:
        """n_share * world / n_global for training batch ``step``: 1.0 unless the global batch splits unevenly."""
        n = min(self.batch_size, self._stops() - step * self.batch_size)
        lo, hi = share(n, self.rank, self.world)
        return (hi - lo) * self.world / n

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() * self.scale + self.shift).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self):
        n = len(self.images)
        order = torch.randperm(n, device=self.device, generator=self.generator) if self.train else None
        first, stop = self._span()
        for start in range(first, stop, self.batch_size):
            if order is None:
                end = min(start + self.batch_size, stop)
                x, y = self.images[start:end], self.labels[start:end]
            else:
                idx = order[start:start + self.batch_size]      # the global batch
                lo, hi = share(len(idx), self.rank, self.world)
                if self.augment is None:
                    x, y = self.images[idx[lo:hi]], self.labels[idx[lo:hi]]
                else:
                    x, y = self.augment(self.images[idx], self.labels[idx], self.generator)
                    x, y = x[lo:hi], y[lo:hi]
            yield self.normalize(x), y


def share(n: int, rank: int, world: int) -> tuple[int, int]:
    """Process ``rank``'s contiguous part [lo, hi) of ``n`` items (parts differ by at most one)."""
    return rank * n // world, (rank + 1) * n // world
