"""Curvature and flatness of a trained network's loss: the Hessian's top
eigenvalue and a 1D loss profile along a filter-normalised random direction.

Both functions take the model as given: train/eval mode is the caller's
choice (eval mode is the usual one, so that BatchNorm uses its running
statistics and the loss is a fixed function of the weights). Whatever the
mode, the model is left as it was found: parameters and buffers (BatchNorm
running statistics, which a forward pass in train mode updates) are restored
bit for bit.

The loss throughout is ``mean over batches of loss_fn(model(x), y)`` for
``batches = [(x, y), ...]``: fixed batches, so that repeated evaluations see
the same function.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn


class AnalysisError(ValueError):
    """An analysis input a user can fix: no batches, no parameters, a bad setting."""


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_batches(batches) -> list:
    batches = list(batches)
    if not batches:
        raise AnalysisError("no batches given: pass a list of (inputs, targets) pairs")
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise AnalysisError(f"batch {i} is not an (inputs, targets) pair")
    return batches


def _batch_loss(model: nn.Module, loss_fn: LossFn, x, y, n: int) -> torch.Tensor:
    loss = loss_fn(model(**x) if isinstance(x, dict) else model(x), y)  # a dict: keyword inputs (transformers)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise AnalysisError("loss_fn must return a scalar tensor (use a mean or sum reduction)")
    return loss.reshape(()) / n


@contextlib.contextmanager
def _buffers_kept(model: nn.Module):
    """Restore every buffer (BatchNorm statistics, counters) on exit, bit for bit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Sequence) -> float:
    """``mean over batches of loss_fn(model(x), y)``, without gradients, as a float.

    The model is used as given and its buffers are restored afterwards.
    """
    batches = _check_batches(batches)
    total = 0.0
    with torch.no_grad(), _buffers_kept(model):
        for x, y in batches:
            total += float(_batch_loss(model, loss_fn, x, y, len(batches)))
    return total


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((u.double() * v.double()).sum() for u, v in zip(a, b)))


def _hvp(model, loss_fn, batches, params, v) -> list[torch.Tensor]:
    """Hessian-vector product of the mean loss, one double backward per batch.

    Attention runs on PyTorch's math kernel here: the fused scaled-dot-product kernels (flash, memory-efficient,
    the CPU flash kernel transformers' models use) have no second derivative."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        with sdpa_kernel(SDPBackend.MATH):
            loss = _batch_loss(model, loss_fn, x, y, len(batches))
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        gv = sum((g * u).sum() for g, u in zip(grads, v) if g is not None)
        if not isinstance(gv, torch.Tensor) or not gv.requires_grad:
            continue  # the gradient does not depend on the parameters: this batch's H is zero
        hv = torch.autograd.grad(gv, params, allow_unused=True)
        for acc, h in zip(out, hv):
            if h is not None:
                acc.add_(h.detach())
    return out


def hessian_top_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence,
    iters: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    params: Iterable[torch.Tensor] | None = None,
) -> float:
    """The Hessian eigenvalue of largest magnitude, by power iteration.

    The loss is ``mean over batches of loss_fn(model(x), y)``; the Hessian is
    taken over ``params`` (default: every parameter with ``requires_grad``),
    flattened into one vector. Each iteration multiplies a unit vector by the
    Hessian (a Hessian-vector product by double backward: one forward and two
    backward passes per batch, the Hessian is never formed) and normalises.

    Power iteration converges to the eigenvector whose eigenvalue has the
    largest *absolute value*; the value returned is the Rayleigh quotient
    ``v.Hv`` there, so it keeps its sign: at a minimum it is the top positive
    eigenvalue (the sharpness), but if a negative eigenvalue is larger in
    magnitude, that is what is returned. Convergence is geometric in
    ``|lambda_2 / lambda_1|``: iteration stops after ``iters`` products or when
    two successive estimates differ by less than ``tol`` relative to the
    latest, whichever comes first. If the two largest-magnitude eigenvalues
    are ``+l`` and ``-l`` the iteration does not converge.

    The start vector is drawn from a generator seeded with ``seed``.
    Train/eval mode is left to the caller; parameters and buffers are left as
    they were. Returns 0.0 when the Hessian is zero.
    """
    if iters < 1:
        raise AnalysisError(f"iters must be >= 1, got {iters}")
    if not tol >= 0:
        raise AnalysisError(f"tol must be >= 0, got {tol}")
    batches = _check_batches(batches)
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise AnalysisError("no parameters to differentiate: none has requires_grad; pass params=...")
    gen = torch.Generator().manual_seed(int(seed))
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=p.device, dtype=p.dtype) for p in params]
    norm = math.sqrt(_dot(v, v))
    v = [u / norm for u in v]
    eig = None
    with torch.enable_grad(), _buffers_kept(model):
        for _ in range(iters):
            hv = _hvp(model, loss_fn, batches, params, v)
            new = _dot(v, hv)  # Rayleigh quotient, |v| = 1
            hnorm = math.sqrt(_dot(hv, hv))
            if not math.isfinite(new) or not math.isfinite(hnorm):
                raise AnalysisError("the Hessian-vector product is not finite: the loss is inf/nan at these weights")
            if hnorm == 0.0:
                return 0.0
            v = [h / hnorm for h in hv]
            if eig is not None and abs(new - eig) <= tol * abs(new):
                return new
            eig = new
    assert eig is not None  # iters >= 1 was checked
    return eig


def _direction(named: list[tuple[str, torch.Tensor]], gen: torch.Generator) -> list[torch.Tensor]:
    """Filter-normalised Gaussian direction (Li et al. 2018).

    For each parameter with ``dim() >= 2`` every filter (slice along dim 0:
    an output channel of a conv, an output unit of a linear layer) is rescaled
    to the norm of the same filter of the weights; filters whose weights are
    all zero get a zero direction. Parameters with ``dim() < 2`` (biases,
    normalisation) get a zero direction.
    """
    out = []
    for _, p in named:
        if p.dim() < 2:
            out.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        w = p.detach().to(device="cpu", dtype=torch.float64)
        dn = d.reshape(d.shape[0], -1).norm(dim=1)
        wn = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = torch.where(dn > 0, wn / dn.clamp_min(1e-300), torch.zeros_like(wn))
        d = d * scale.reshape(-1, *([1] * (p.dim() - 1)))
        out.append(d.to(device=p.device, dtype=p.dtype))
    return out


def loss_profile(
    model: nn.Module, loss_fn: LossFn, batches: Sequence, alphas: Sequence[float], seed: int = 0
) -> list[float]:
    """The loss along one filter-normalised random direction: ``[L(w + a d) for a in alphas]``.

    ``d`` is a Gaussian direction drawn with ``seed``, filter-normalised as in
    Li et al. 2018 ("Visualizing the loss landscape of neural nets"): each
    filter of ``d`` (slice along dim 0 of every parameter with ``dim() >= 2``)
    has the norm of the matching filter of the weights, and biases and
    normalisation parameters get a zero direction. Filter normalisation makes
    profiles of differently scaled networks comparable: ``a = 1`` moves every
    filter by its own norm.

    ``L`` is ``mean over batches of loss_fn(model(x), y)`` without gradients,
    the model in the mode the caller left it. At ``a = 0`` the value is the
    loss at the model's own weights. Parameters and buffers are restored bit
    for bit afterwards, also on error.
    """
    batches = _check_batches(batches)
    alphas = [float(a) for a in alphas]
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise AnalysisError("alphas must be a non-empty list of finite numbers")
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    if not any(p.dim() >= 2 for _, p in named):
        raise AnalysisError("the model has no parameter with dim() >= 2 to move along")
    direction = _direction(named, torch.Generator().manual_seed(int(seed)))
    saved = [p.detach().clone() for _, p in named]
    out = []
    try:
        with torch.no_grad(), _buffers_kept(model):
            for a in alphas:
                for (_, p), w0, d in zip(named, saved, direction):
                    if a == 0.0:
                        p.copy_(w0)
                    else:
                        p.copy_(w0 + a * d)
                out.append(mean_loss(model, loss_fn, batches))
    finally:
        with torch.no_grad():
            for (_, p), w0 in zip(named, saved):
                p.copy_(w0)
    return out
