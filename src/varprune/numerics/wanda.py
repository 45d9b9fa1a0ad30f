"""Wanda: one-shot pruning by weight magnitude times input-feature norm, calibrated sequentially.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models" (2023); the
algorithm of locuslab/wanda (``lib/prune.py`` ``prune_wanda``, ``lib/layerwrapper.py`` ``WrappedGPT``):

* the score of weight ``W_ij`` (matrix view ``(out, in)``) is ``|W_ij| * ||X_j||_2``, the norm over every
  calibration token (every output position of a convolution) of every batch. Statistics are kept as the
  running mean of squared norms, as the reference does; a constant factor does not change the ranking;
* unstructured: in every output row the ``int(in * sparsity)`` lowest scores are pruned, ties by position
  (a stable sort: the earlier of equal scores is pruned first);
* N:M: in every group of M consecutive inputs of a row the M-N lowest scores are pruned, ties by position;
* the weights are not updated, only zeroed.

Calibration is sequential (`varprune.numerics.calibration`): each layer's norms come from the inputs
the already pruned earlier part of the network produces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from varprune.numerics.calibration import PruneResult, Setting, Target, compute_dtype, prune_sequentially
from varprune.numerics.pruning import PruningError

__all__ = ["FeatureNorms", "prune_wanda", "wanda_keep"]


class FeatureNorms:
    """Running mean over calibration tokens of every input feature's square: ``||X_j||² / tokens``."""

    def __init__(self, columns: int, dtype: torch.dtype, device: torch.device):
        self.sq = torch.zeros(columns, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, rows: torch.Tensor) -> None:
        """Add ``(tokens, in)`` input rows."""
        t = rows.shape[0]
        if t == 0:
            return
        self.sq *= self.tokens / (self.tokens + t)
        self.tokens += t
        self.sq += rows.square().sum(0) / self.tokens


def wanda_keep(weight: torch.Tensor, sq_norms: torch.Tensor, setting: Setting, name: str = "weight") -> torch.Tensor:
    """Wanda's keep-mask (True = kept) of an ``(out, in)`` matrix, from the squared input-feature norms."""
    score = weight.abs() * sq_norms.sqrt().reshape(1, -1)
    if not bool(torch.isfinite(score).all()):
        raise PruningError(f"{name}: non-finite Wanda scores (NaN/inf weights or calibration inputs); check both")
    rows, cols = score.shape
    if setting.nm:
        n, m = setting.nm
        groups = score.reshape(rows, cols // m, m)
        pruned = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]  # earlier of equal scores first
        keep = torch.ones(groups.shape, dtype=torch.bool, device=score.device)
        return keep.scatter_(-1, pruned, False).reshape(rows, cols)
    assert setting.sparsity is not None  # a Setting holds a sparsity or an N:M pattern (Setting.of)
    keep = torch.ones(score.shape, dtype=torch.bool, device=score.device)
    k = int(cols * setting.sparsity)
    if k:
        keep.scatter_(1, torch.argsort(score, dim=1, stable=True)[:, :k], False)
    return keep


def prune_wanda(
    model: nn.Module,
    batches,
    sparsity: float | None = None,
    pattern: str | None = None,
    exclude: Iterable[str] = (),
    progress: Callable[[str], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place with Wanda; return keep-masks by parameter name (a
    [`PruneResult`][varprune.numerics.calibration.PruneResult]).

    ``batches``: calibration inputs, an iterable of tensors (``model(x)``) or dicts of tensors
    (``model(**batch)``, Hugging Face models); a generator is read once. Exactly one of ``sparsity``
    (unstructured, in [0, 1): ``int(in * sparsity)`` weights pruned in every output row) or ``pattern``
    (``"N:M"``: keep N of every M consecutive inputs). ``exclude``: names or patterns of prunable weights to
    leave alone (as [`prunable_weights`][varprune.numerics.weights.prunable_weights]). Pruned weights become
    +0.0. Layers Wanda cannot
    view as a matrix are pruned by magnitude at the same setting and listed in ``result.fallback``; N:M
    layers whose input size is not a multiple of M stay dense, listed in ``result.skipped``. ``progress``: called
    with each layer's name once Wanda has pruned it (a progress bar). Bad input raises `PruningError`.
    """
    setting = Setting.of(sparsity, pattern)

    def new_stats(t: Target) -> FeatureNorms:
        return FeatureNorms(t.columns, compute_dtype(t.param), t.param.device)

    def prune_layer(t: Target, stats: FeatureNorms):
        w = t.matrix(compute_dtype(t.param))
        keep = wanda_keep(w, stats.sq, setting, t.name)
        if progress is not None:
            progress(t.name)
        return keep, None

    return prune_sequentially(model, batches, setting, exclude, new_stats, prune_layer)
