"""One-shot magnitude pruning and BatchNorm re-tuning.

Protocol (CrAM convention, ../shared/METHOD.md section 3): global unstructured
magnitude pruning over every prunable weight (first conv and classifier
included), or layer-wise uniform pruning; sparsity is counted over the pruned
tensors only. Ties are broken by position so that the number of removed
weights is exactly ``round(sparsity * n)``.

For a sweep, :class:`MagnitudePruner` sorts the magnitudes once and reads
every sparsity's mask from the same order (torch.quantile refuses inputs over
2^24 elements, and on GPU kthvalue is far slower than one sort).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .weights import prunable_weights

SCOPES = ("global", "layerwise")


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return s


class MagnitudePruner:
    """Magnitude masks for any sparsity, from one sort of the model's weights.

    The order is computed from the weights at construction time; ``masks(s)``
    and ``apply(s)`` then cost one scatter per call.
    """

    def __init__(self, model: nn.Module, scope: str = "global", exclude: Iterable[str] = ()):
        if scope not in SCOPES:
            raise ValueError(f"unknown pruning scope {scope!r}; choose one of {', '.join(SCOPES)}")
        self.scope = scope
        self.named = prunable_weights(model, exclude)
        if not self.named:
            raise ValueError("nothing to prune: no conv or linear weights left after exclusions")
        self.lengths = [p.numel() for _, p in self.named]
        with torch.no_grad():
            if scope == "global":
                flat = torch.cat([p.detach().abs().reshape(-1).float() for _, p in self.named])
                self.order = [torch.argsort(flat, stable=True)]
            else:
                self.order = [torch.argsort(p.detach().abs().reshape(-1).float(), stable=True) for _, p in self.named]

    @property
    def numel(self) -> int:
        return sum(self.lengths)

    def masks(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Boolean keep-masks (True = kept) by parameter name."""
        s = check_sparsity(sparsity)
        if self.scope == "global":
            keep = torch.ones(self.numel, dtype=torch.bool, device=self.order[0].device)
            keep[self.order[0][: round(s * self.numel)]] = False
            pieces = keep.split(self.lengths)
        else:
            pieces = []
            for order, n in zip(self.order, self.lengths):
                keep = torch.ones(n, dtype=torch.bool, device=order.device)
                keep[order[: round(s * n)]] = False
                pieces.append(keep)
        return {name: piece.view_as(p) for (name, p), piece in zip(self.named, pieces)}

    @torch.no_grad()
    def apply(self, sparsity: float) -> dict[str, torch.Tensor]:
        """Zero the pruned weights in place; return the keep-masks."""
        masks = self.masks(sparsity)
        for name, p in self.named:
            p.mul_(masks[name])
        return masks


def prune_magnitude(model: nn.Module, sparsity: float, scope: str = "global",
                    exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude weights in place; return keep-masks by name.

    ``scope="global"`` ranks all prunable weights together; ``"layerwise"``
    removes the same fraction from every tensor. The realised sparsity over
    the pruned tensors is ``round(sparsity * n) / n`` (per tensor for
    layer-wise), ties broken by position.
    """
    return MagnitudePruner(model, scope, exclude).apply(sparsity)


def realised_sparsity(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of zeros among the masked tensors."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable) -> nn.Module:
    """BatchNorm re-tuning: recompute running statistics for the current weights.

    Resets every BatchNorm's running mean and variance, then runs forward
    passes without gradients with only the BatchNorm layers in train mode and
    ``momentum=None`` (a cumulative average over all batches, so the result
    does not depend on the batch order). ``batches`` yields input tensors or
    ``(inputs, targets)`` pairs. Leaves the model in eval mode.
    """
    layers = batchnorm_layers(model)
    model.eval()
    if not layers:
        return model
    saved = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
    finally:
        for bn, m in zip(layers, saved):
            bn.momentum = m
        model.eval()
    return model


def sparsity_of(model: nn.Module, exclude: Iterable[str] = ()) -> float:
    """Fraction of exact zeros among the prunable weights."""
    named = prunable_weights(model, exclude)
    zeros = sum(int((p == 0).sum()) for _, p in named)
    return zeros / sum(p.numel() for _, p in named)

