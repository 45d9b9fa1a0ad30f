"""What the segmentation readers share: :class:`SegSplits`, case splits, intensity and size handling.

Conventions shared by the readers (volumes.py: MSD / nnU-Net and Colin27; segfolder.py: image/mask
folders):

* images are uint8 ``(N, C, H, W)``: intensities are normalised per volume (or
  per image, for 16-bit images) by clipping to the 0.5-99.5 percentile of the
  nonzero values and scaling that range to 0..255; 8-bit photographs are kept
  as they are;
* labels are int64 ``(N, H, W)``, 0 is background;
* every slice of a set has the same ``size``: images are resampled bilinearly
  (with antialiasing when shrinking), labels by nearest neighbour (Colin27:
  by majority, see :func:`varprune.data.volumes.read_colin27`);
* readers are strict: every malformed input raises :class:`DatasetError` with
  one line naming the file, the problem and the fix. Nothing is downloaded and
  nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from varprune.data.base import DatasetError


@dataclass
class SegSplits:
    """A 2D segmentation set held whole in memory, on the CPU.

    ``train_origin``/``test_origin`` say where each slice came from: an int64
    ``(N, 2)`` tensor of (case number, slice index), the case number indexing
    ``cases`` (volume or image names); the slice index is the position along
    the slicing axis (0 for 2D images).
    """

    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N, H, W), 0 = background
    test_x: torch.Tensor
    test_y: torch.Tensor
    channels: int
    size: tuple[int, int]  # (H, W)
    num_classes: int  # including background
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of train_x / 255
    std: tuple[float, ...]
    source: str
    train_origin: torch.Tensor | None = None
    test_origin: torch.Tensor | None = None
    cases: tuple[str, ...] = ()


# ------------------------------------------------------------------ helpers


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:100]


def _check_size(size) -> tuple[int, int]:
    try:
        h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    except (TypeError, ValueError, IndexError):
        raise DatasetError(f"size {size!r} is not (height, width); pass two positive integers") from None
    if h < 1 or w < 1:
        raise DatasetError(f"size {size!r} must be positive; pass two positive integers")
    return h, w


def split_cases(n: int, test_fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """Seeded split of ``n`` cases (volumes or images) into sorted train and test indices.

    ``max(1, round(n * test_fraction))`` cases are held out and at least one
    stays for training, so ``n >= 2`` is needed; the same ``seed`` gives the
    same split. ``what`` names the data in the error message.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise DatasetError(f"test_fraction {test_fraction} must lie strictly between 0 and 1 (e.g. 0.2)")
    if n < 2:
        raise DatasetError(
            f"{what} holds {n} case(s), too few to split into train and test; "
            f"add cases or provide train/ and test/ folders"
        )
    n_test = min(n - 1, max(1, round(n * float(test_fraction))))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[n_test:]), sorted(order[:n_test])


def normalise_intensity(vol: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentile of the nonzero values and scale to 0..255 (float32).

    Without nonzero values the result is all zero; when the two percentiles
    coincide (a binary or constant image) values at or above them map to 255.
    """
    vol = np.asarray(vol, dtype=np.float32)
    nz = vol[vol != 0]
    if nz.size == 0:
        return np.zeros_like(vol)
    lo, hi = np.percentile(nz, [0.5, 99.5])
    if hi <= lo:
        return np.where(vol >= hi, 255.0, 0.0).astype(np.float32)
    return ((np.clip(vol, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.float32)


def _resize_labels(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """int (N, h, w) -> int64 (N, H, W) by nearest neighbour (pixel centres, 'nearest-exact')."""
    if tuple(y.shape[-2:]) != size:
        y = F.interpolate(y[:, None].float(), size=size, mode="nearest-exact")[:, 0]
    return y.round().to(torch.int64)


def _finish(train, test, channels, size, class_names, source, cases) -> SegSplits:
    """Stack per-case slices into the splits and compute the training mean/std."""

    def stack(parts):
        if not parts:
            return (
                torch.zeros((0, channels, *size), dtype=torch.uint8),
                torch.zeros((0, *size), dtype=torch.int64),
                torch.zeros((0, 2), dtype=torch.int64),
            )
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))

    tx, ty, to = stack(train)
    vx, vy, vo = stack(test)
    if len(tx) == 0 or len(vx) == 0:
        empty = "training" if len(tx) == 0 else "test"
        raise DatasetError(f"{source}: the {empty} split has no slices; use more cases or another split")
    xs = tx.to(torch.float64).div_(255.0)
    mean = tuple(float(v) for v in xs.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-6) for v in xs.std(dim=(0, 2, 3), correction=0))
    return SegSplits(
        tx, ty, vx, vy, channels, size, len(class_names), tuple(class_names), mean, std, source, to, vo, tuple(cases)
    )


# -------------------------------------------------------------------- NIfTI
