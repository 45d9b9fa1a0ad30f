"""Loss terms over the prunable weights: VAR, l1 and Hoyer-square.

Each regularizer has two faces:

* ``reg()`` returns ``strength * penalty`` as an autograd tensor, for users who
  add it to their loss (two lines in any training loop);
* ``reg.apply_gradient_()`` adds ``strength * d penalty / d w`` to every
  weight's ``.grad`` after ``loss.backward()``, in closed form, over one flat
  buffer holding all layers, with no autograd graph. This is the path the
  training loop uses: its cost is a few passes over the weights per step,
  independent of the number of layers, and it never synchronises with the host.

VAR (arXiv 2511.14282), for each prunable tensor w with n elements::

    w~  = sqrt(w^2 + r)                      smooth |w|
    V   = mean(w~^2) - mean(w~)^2            population variance of |w|
    psi = sum over layers of 1 / (V + eps)
    d psi / d w_i = -2 / (n (V + eps)^2) * (w~_i - mean(w~)) * w_i / w~_i

Numerics: the variance is computed from deviations to the layer's first
magnitude (variance is shift invariant), then re-centred. A layer whose
magnitudes are all equal then has exactly zero deviations, so its gradient is
exactly zero instead of rounding noise amplified by 1/eps^2 = 1e16.
"""
from __future__ import annotations

import torch
from torch import nn

from .weights import as_weight_list


def _layer_variance(w: torch.Tensor, r: float) -> torch.Tensor:
    wt = torch.sqrt(w * w + r).reshape(-1)
    d = wt - wt[0].detach()
    e = d - d.mean()
    return (e * e).mean()


def var_penalty(weights, r: float = 1e-8, eps: float = 1e-8) -> torch.Tensor:
    """psi(w) = sum_l 1 / (Var(sqrt(w_l^2 + r)) + eps), with autograd.

    ``weights``: an iterable of tensors, of ``(name, tensor)`` pairs, or a model
    (its prunable weights).
    """
    named = as_weight_list(weights)
    if not named:
        raise ValueError("var_penalty needs at least one weight tensor")
    terms = [1.0 / (_layer_variance(w, r) + eps) for _, w in named]
    return torch.stack(terms).sum()


def l1_penalty(weights) -> torch.Tensor:
    """sum over all prunable weights of |w|."""
    return torch.stack([w.abs().sum() for _, w in as_weight_list(weights)]).sum()


def hoyer_square_penalty(weights) -> torch.Tensor:
    """DeepHoyer's Hoyer-square, per layer: sum_l (sum |w_l|)^2 / sum w_l^2."""
    terms = [w.abs().sum() ** 2 / (w * w).sum() for _, w in as_weight_list(weights)]
    return torch.stack(terms).sum()


class _FlatLayers:
    """All prunable tensors seen as one flat vector split into segments.

    ``seg`` maps each flat position to its layer, ``first`` holds each layer's
    first flat position. Rebuilt when the weights move to another device.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.lengths = [p.numel() for p in params]
        self.device = None

    def _build(self, device):
        lengths = torch.tensor(self.lengths, dtype=torch.long)
        self.numel = lengths.to(device)
        self.seg = torch.repeat_interleave(torch.arange(len(self.lengths)), lengths).to(device)
        self.first = (torch.cumsum(lengths, 0) - lengths).to(device)
        self.device = device

    def flat(self) -> torch.Tensor:
        device = self.params[0].device
        if device != self.device:
            self._build(device)
        dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
        return torch.cat([p.detach().reshape(-1).to(dtype) for p in self.params])

    def segment_sum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(x, "sum", lengths=self.numel)

    def add_to_grads_(self, g: torch.Tensor) -> None:
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        pieces = [piece.view_as(p).to(p.grad.dtype) for piece, p in zip(g.split(self.lengths), self.params)]
        torch._foreach_add_(grads, pieces)


class Regularizer:
    """Base class: a penalty over prunable weights, scaled by ``strength``."""

    name = "regularizer"

    def __init__(self, model_or_weights, strength: float):
        if strength < 0:
            raise ValueError(f"{self.name} strength must be >= 0, got {strength}")
        self.named = as_weight_list(model_or_weights)
        if not self.named:
            raise ValueError(f"{self.name}: the model has no prunable (conv or linear) weights")
        self.strength = float(strength)
        self._flat = _FlatLayers([p for _, p in self.named])

    @property
    def weights(self) -> list[torch.Tensor]:
        return [p for _, p in self.named]

    def penalty(self) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self) -> torch.Tensor:
        """``strength * penalty`` with autograd: add it to your loss."""
        return self.strength * self.penalty()

    def _value_and_grad(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def apply_gradient_(self) -> torch.Tensor:
        """Add ``strength * d penalty / d w`` to each weight's ``.grad``.

        Call it after ``loss.backward()``. Returns ``strength * penalty`` as a
        detached 0-d tensor on the weights' device (no host synchronisation).
        """
        flat = self._flat.flat()
        value, grad = self._value_and_grad(flat)
        if self.strength != 0:
            self._flat.add_to_grads_(grad * self.strength)
        return value * self.strength


class VarRegularizer(Regularizer):
    """The Variance Amplifying Regularizer: ``lam * sum_l 1 / (Var(|w_l|) + eps)``.

    Two-line use in your own loop::

        reg = VarRegularizer(model, lam=1e-6)
        loss = criterion(model(x), y) + reg()        # autograd path
        # or, faster: loss.backward(); reg.apply_gradient_()

    ``reg.variances()`` gives the per-layer variance of |w| (for logging).
    """

    name = "VAR"

    def __init__(self, model_or_weights, lam: float, r: float = 1e-8, eps: float = 1e-8):
        if r <= 0 or eps <= 0:
            raise ValueError(f"VAR needs r > 0 and eps > 0, got r={r}, eps={eps}")
        super().__init__(model_or_weights, lam)
        self.r = float(r)
        self.eps = float(eps)
        self.last_variances: torch.Tensor | None = None

    @property
    def lam(self) -> float:
        return self.strength

    def penalty(self) -> torch.Tensor:
        return var_penalty(self.named, self.r, self.eps)

    def _stats(self, flat):
        fl = self._flat
        wt = torch.sqrt(flat * flat + self.r)
        d = wt - wt[fl.first][fl.seg]
        n = fl.numel.to(flat.dtype)
        e = d - (fl.segment_sum(d) / n)[fl.seg]
        var = fl.segment_sum(e * e) / n
        return wt, e, var, n

    def _value_and_grad(self, flat):
        fl = self._flat
        wt, e, var, n = self._stats(flat)
        self.last_variances = var
        inv = 1.0 / (var + self.eps)
        coef = (-2.0 / n) * inv * inv
        grad = coef[fl.seg] * e * flat / wt
        return inv.sum(), grad

    @torch.no_grad()
    def variances(self) -> dict[str, float]:
        """Per-layer population variance of sqrt(w^2 + r), by parameter name."""
        _, _, var, _ = self._stats(self._flat.flat())
        return {name: float(v) for (name, _), v in zip(self.named, var.tolist())}


class L1Regularizer(Regularizer):
    """``alpha * sum |w|`` over the prunable weights."""

    name = "l1"

    def penalty(self) -> torch.Tensor:
        return l1_penalty(self.named)

    def _value_and_grad(self, flat):
        return flat.abs().sum(), torch.sign(flat)


class HoyerSquareRegularizer(Regularizer):
    """DeepHoyer: ``alpha * sum_l (sum |w_l|)^2 / sum w_l^2``."""

    name = "Hoyer-square"

    def penalty(self) -> torch.Tensor:
        return hoyer_square_penalty(self.named)

    def _value_and_grad(self, flat):
        fl = self._flat
        s1 = fl.segment_sum(flat.abs())
        s2 = fl.segment_sum(flat * flat)
        # d/dw (s1^2 / s2) = 2 s1 sign(w) / s2 - 2 s1^2 w / s2^2
        a = (2.0 * s1 / s2)[fl.seg]
        b = (2.0 * s1 * s1 / (s2 * s2))[fl.seg]
        return (s1 * s1 / s2).sum(), a * torch.sign(flat) - b * flat
