"""Augmentation on the device: one random draw applied to an image and, for segmentation, its mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _shift_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image of ``x`` (B, C, H, W) zero-padded by ``pad`` and cropped back at offset (dy, dx)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    return xp[batch, chans, rows, cols]


def crop_flip(x: torch.Tensor, y: torch.Tensor | None, pad: int, flip: bool, generator: torch.Generator):
    """Random shift-crop (zero padding ``pad``) and horizontal flip, one draw per image.

    ``y`` is a label map (B, H, W) that receives exactly the same crop and
    flip as ``x`` (padding becomes background, class 0), or None. Draw order:
    row offsets, column offsets, flips: the same random stream whether or not
    a mask comes along.
    """
    b = x.shape[0]
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        x = _shift_crop(x, dy, dx, pad)
        if y is not None:
            y = _shift_crop(y[:, None], dy, dx, pad)[:, 0]
    if flip:
        f = torch.rand(b, device=x.device, generator=generator) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(3), x)
        if y is not None:
            y = torch.where(f[:, None, None], y.flip(2), y)
    return x, y
