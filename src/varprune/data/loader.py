"""The loader that lives on the device, and the fixed subsets and splits every run draws from.

Every set that fits is held whole on the accelerator as uint8 (CIFAR-10 train:
150 MB), so the loader shuffles with ``randperm`` on the device and crops,
flips and normalises whole batches there: no worker processes, no
host-to-device copies and no host synchronisation per step.
"""

from __future__ import annotations

import torch

from varprune.data.base import DatasetError, DatasetInfo


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

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        info: DatasetInfo,
        batch_size: int,
        train: bool,
        device="cpu",
        seed: int = 0,
        augment=None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world: int = 1,
    ):
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

    def take(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at ``index`` (1-D), raw (unnormalised, unaugmented) and their targets, on the device: what
        BN re-tuning, calibration and the analysis draw; :meth:`normalize` makes them model inputs."""
        index = index.to(self.images.device)
        return self.images[index], self.labels[index]

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
                idx = order[start : start + self.batch_size]  # the global batch
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
