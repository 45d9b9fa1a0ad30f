"""Image folders too large for the device: decoded from the files by DataLoader workers, batch by batch.

:func:`varprune.data.folders.estimate_bytes` and :func:`varprune.device.fits_on_device` decide; when the
decoded set does not fit, :class:`StreamingLoader` takes the place of
:class:`varprune.data.loader.DeviceLoader` with the same iteration interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from varprune.data.base import DatasetInfo, open_image
from varprune.data.folders import (
    GRAY_MODES,
    FileList,
    _info,
    channel_stats,
    decode_files,
    decode_image,
    default_workers,
)


class _FileDataset(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int, mode: str):
        self.files = [str(p) for p in files]
        self.labels = list(labels)
        self.image_size = image_size
        self.mode = mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        a, _ = decode_image(self.files[i], self.image_size, self.mode)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a)), self.labels[i]


class StreamingLoader:
    """Batches decoded from files by DataLoader workers, augmented and normalised on the host.

    The fallback when a set does not fit on the device; iterates like
    :class:`varprune.data.DeviceLoader`: ``len()`` batches, each ``(x, y)``
    with x normalised float (``dtype``) and y int64, both on ``device``; every
    example once per epoch, the last batch may be smaller. Order, crops and
    flips come from ``self.generator`` (a CPU torch.Generator seeded by
    ``seed``; save its state to resume), never from worker processes, so the
    batches do not depend on ``num_workers``. ``info.channels`` decides the
    decode mode (1: L, 3: RGB).
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        info: DatasetInfo,
        batch_size: int,
        train: bool,
        device="cpu",
        seed: int = 0,
        augment=None,
        num_workers: int | None = None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.device = torch.device(device)
        self.dataset = _FileDataset(files, labels, info.size, "L" if info.channels == 1 else "RGB")
        self.info = info
        self.batch_size = int(batch_size)
        self.train = train
        self.augment = augment if train else None  # a task's augment(x, y, generator), or None
        self.num_workers = default_workers() if num_workers is None else int(num_workers)
        self.channels_last = channels_last
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(seed)
        std = torch.tensor(info.std)
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(info.mean) / std).view(1, -1, 1, 1)

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``index`` decoded from their files (raw uint8, unaugmented) and their labels, on the
        device: :meth:`varprune.data.DeviceLoader.take` for a set that is not held there."""
        rows = index.tolist()
        with ThreadPoolExecutor(max(1, self.num_workers)) as pool:
            pairs = list(pool.map(self.dataset.__getitem__, rows))
        shape = (0, self.info.channels, self.info.size, self.info.size)
        x = torch.stack([a for a, _ in pairs]) if pairs else torch.zeros(shape, dtype=torch.uint8)
        return x.to(self.device), torch.tensor([label for _, label in pairs], dtype=torch.int64, device=self.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() * self.scale.to(x.device) + self.shift.to(x.device)).to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator).tolist() if self.train else list(range(n))
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in loader:
            if self.augment is not None:
                x, y = self.augment(x, y, self.generator)
            x = self.normalize(x)
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def streaming_info(listing: FileList, image_size: int, sample: int = 512, workers: int | None = None) -> DatasetInfo:
    """A DatasetInfo for streaming ``listing`` without decoding it all.

    Channels follow the same rule as the decoded path (1 only if every image
    is greyscale), read from the image headers alone; mean/std come from a
    deterministic sample of up to ``sample`` training images.
    """
    files = listing.train_files + listing.test_files

    def is_gray(path: Path) -> bool:
        with open_image(path, verb="decode") as im:  # the rule of decode_image: special files, huge images
            return im.mode in GRAY_MODES

    with ThreadPoolExecutor(workers or default_workers()) as pool:
        all_gray = all(pool.map(is_gray, files))
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(listing.train_files), generator=g)[:sample].sort().values.tolist()
    decoded, _ = decode_files([listing.train_files[i] for i in pick], image_size, workers, desc="sampling")
    x = torch.from_numpy(np.ascontiguousarray(decoded[:, :1] if all_gray else decoded))
    mean, std = channel_stats(x)
    return _info(listing, 1 if all_gray else 3, image_size, mean, std)
