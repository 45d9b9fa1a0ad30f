"""SparseGPT: one-shot pruning with an optimal-brain-surgeon weight update, calibrated sequentially.

Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023); the
algorithm of IST-DASLab/sparsegpt (``sparsegpt.py``: ``SparseGPT.add_batch``, ``fasterprune``), for a
weight viewed as a matrix ``W`` of shape ``(out, in)``:

* ``H = 2/n · Σ x xᵀ`` over the n calibration tokens (rows of the layer's input; a convolution's unfolded
  positions), kept as a running mean as the reference does (a constant factor changes nothing below);
* dead inputs (``H_jj == 0``) get ``H_jj = 1`` and their weight column is zeroed; ``percdamp · mean(diag H)``
  is added to the diagonal; ``Hinv`` is the upper Cholesky factor of ``H⁻¹`` (``cholesky``,
  ``cholesky_inverse``, upper ``cholesky``). If a factorisation fails (a Hessian singular beyond the
  damping, or not finite) the damping is raised tenfold, up to ``mean(diag H)`` itself; the value used is
  recorded in ``result.damping``; past that a `PruningError` names the layer;
* columns are processed in blocks of ``blocksize``. Unstructured: per block, ``tmp = W1² / diag(Hinv1)²``
  and every weight with ``tmp <= sort(tmp)[int(tmp.numel() · sparsity)]`` is pruned (the reference's rule:
  with ties at the threshold a block can lose one weight or more above the requested count; the realised
  sparsity is reported as it is). At sparsity 0 nothing is pruned (the rule would still take each block's
  smallest). N:M: at every column ``i`` of a block with ``i % M == 0`` the M-N columns of ``i..i+M-1``
  with the smallest ``tmp`` in each row are pruned, ``tmp`` read from the weights updated so far; ties by
  position (a stable sort, the earlier column pruned first, where the reference's ``topk`` is unspecified);
* then column by column the pruned weights are set to zero and the error ``(w - q) / Hinv_ii`` is spread
  over the block's later columns (``W1[:, i:] -= err ⊗ Hinv1[i, i:]``), and after the block the remaining
  columns get the lazy batch update ``W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]``.

Computed in float32 (float64 for a float64 weight); the result is written back in the weight's dtype and
layout. Calibration is sequential (`varprune.numerics.calibration`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from varprune.numerics.calibration import PruneResult, Setting, Target, compute_dtype, prune_sequentially
from varprune.numerics.pruning import PruningError

__all__ = ["Hessian", "inverse_factor", "prune_sparsegpt", "sparsegpt_update"]


class Hessian:
    """Running ``2/n · Σ x xᵀ`` over the calibration tokens (rows) seen so far."""

    def __init__(self, columns: int, dtype: torch.dtype, device: torch.device):
        self.H = torch.zeros(columns, columns, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, rows: torch.Tensor) -> None:
        """Add ``(tokens, in)`` input rows."""
        t = rows.shape[0]
        if t == 0:
            return
        self.H *= self.tokens / (self.tokens + t)
        self.tokens += t
        x = rows * (2.0 / self.tokens) ** 0.5
        self.H.addmm_(x.t(), x)


def _damping_schedule(percdamp: float) -> list[float]:
    out = [percdamp]
    p = percdamp if percdamp > 0 else 1e-6
    while p * 10 <= 1.0 + 1e-12:
        p *= 10
        out.append(p)
    return out


def inverse_factor(H: torch.Tensor, percdamp: float, name: str = "weight") -> tuple[torch.Tensor, float]:
    """``(U, percdamp used)``: the upper Cholesky factor of ``(H + damp·I)⁻¹``, ``damp = percdamp · mean(diag H)``.

    ``H`` is not modified. A failed factorisation retries with tenfold damping up to ``mean(diag H)``;
    then `PruningError`.
    """
    if not bool(torch.isfinite(H).all()):
        raise PruningError(f"{name}: the calibration inputs are not finite (NaN or inf); check the batches")
    mean_diag = torch.diagonal(H).mean()
    tried = []
    for p in _damping_schedule(percdamp):
        Hd = H.clone()
        Hd.diagonal().add_(p * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, p
        tried.append(p)
    raise PruningError(
        f"{name}: SparseGPT's Hessian is singular even with damping {tried[-1]:g} x mean(diag H) "
        f"(tried {', '.join(f'{p:g}' for p in tried)}); use more or different calibration data, or exclude it"
    )


def sparsegpt_update(
    W: torch.Tensor,
    H: torch.Tensor,
    setting: Setting,
    blocksize: int = 128,
    percdamp: float = 0.01,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """SparseGPT on one ``(out, in)`` matrix: ``(new weights, keep-mask, percdamp used)``; inputs unchanged.

    ``W`` and ``H`` in the computation dtype (float32 or float64).
    """
    W, H = W.clone(), H.clone()
    cols = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, used = inverse_factor(H, percdamp, name)
    pruned = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
    n, m = setting.nm or (0, 0)
    sparsity = 0.0 if m else setting.sparsity  # unstructured: the fraction each block prunes
    assert sparsity is not None  # a Setting holds a sparsity or an N:M pattern (Setting.of)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=W.device)
        if not m and sparsity > 0:
            tmp = W1.square() / d.square().reshape(1, -1)
            thresh = torch.sort(tmp.flatten()).values[int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        for i in range(i2 - i1):
            if m and i % m == 0:
                tmp = W1[:, i : i + m].square() / d[i : i + m].square().reshape(1, -1)
                mask1.scatter_(1, i + torch.argsort(tmp, dim=1, stable=True)[:, : m - n], True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    return W, ~pruned, used


def prune_sparsegpt(
    model: nn.Module,
    batches,
    sparsity: float | None = None,
    pattern: str | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    exclude: Iterable[str] = (),
    progress: Callable[[str], None] | None = None,
) -> PruneResult:
    """Prune ``model`` in place with SparseGPT; return keep-masks by parameter name (a
    [`PruneResult`][varprune.numerics.calibration.PruneResult]).

    ``batches``: calibration inputs, an iterable of tensors (``model(x)``) or dicts of tensors
    (``model(**batch)``, Hugging Face models); a generator is read once. Exactly one of ``sparsity``
    (unstructured, in [0, 1), chosen per block of ``blocksize`` columns) or ``pattern`` (``"N:M"``; then
    ``blocksize`` must be a multiple of M). ``percdamp``: damping as a fraction of the mean diagonal of H.
    The kept weights are updated to compensate for the pruned ones; pruned weights become +0.0. Layers
    SparseGPT cannot view as a matrix are pruned by magnitude at the same setting (``result.fallback``);
    N:M layers whose input size is not a multiple of M stay dense (``result.skipped``); layers that needed
    more damping are in ``result.damping``. ``progress``: called with each layer's name once it is pruned.
    Bad input raises `PruningError`.
    """
    setting = Setting.of(sparsity, pattern)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise PruningError(f"blocksize must be a positive integer, got {blocksize!r}")
    if setting.nm and blocksize % setting.nm[1]:
        raise PruningError(f"blocksize ({blocksize}) must be a multiple of M ({setting.nm[1]}) for N:M pruning")
    try:
        percdamp = float(percdamp)
    except (TypeError, ValueError):
        raise PruningError(f"percdamp must be a number >= 0, got {percdamp!r}") from None
    if not percdamp >= 0 or percdamp == float("inf"):
        raise PruningError(f"percdamp must be a finite number >= 0 (e.g. 0.01), got {percdamp}")
    damping: dict[str, float] = {}

    def new_stats(t: Target) -> Hessian:
        return Hessian(t.columns, compute_dtype(t.param), t.param.device)

    def prune_layer(t: Target, stats: Hessian):
        W, keep, used = sparsegpt_update(
            t.matrix(compute_dtype(t.param)), stats.H, setting, blocksize, percdamp, t.name
        )
        if used != percdamp:
            damping[t.name] = used
        if progress is not None:
            progress(t.name)
        return keep, W

    result = prune_sequentially(model, batches, setting, exclude, new_stats, prune_layer)
    result.damping = damping
    return result
