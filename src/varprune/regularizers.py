"""Loss terms over the prunable weights: VAR, l1 and Hoyer-square.

Each regularizer has two faces:

* ``reg()`` returns ``strength * penalty`` as an autograd tensor, for users who
  add it to their loss (two lines in any training loop);
* ``reg.apply_gradient_()`` adds ``strength * d penalty / d w`` to every
  weight's ``.grad`` after ``loss.backward()``, in closed form, with no
  autograd graph. This is the path the training loop uses: four to five fused
  passes over each weight tensor (no temporaries the size of the model, no
  index gathers), and no host synchronisation: per-layer scalars stay 0-d
  tensors on the device.

VAR (arXiv 2511.14282), for each prunable tensor w with n elements::

    w~  = sqrt(w^2 + r)                      smooth |w|
    V   = mean(w~^2) - mean(w~)^2            population variance of |w|
    psi = sum over layers of 1 / (V + eps)
    d psi / d w_i = -2 / (n (V + eps)^2) * (w~_i - mean(w~)) * w_i / w~_i

Numerics: a layer whose magnitudes are all equal sits at psi's maximum, where
the true gradient is zero but rounding noise in (w~_i - mean) would be
amplified by 1/eps^2 = 1e16. Both paths are exact there: the autograd penalty
takes deviations from the layer's first magnitude (variance is shift
invariant), and the fast path uses ``torch.var_mean`` (Welford), whose mean of
equal values is that value exactly.
"""
from __future__ import annotations

import torch


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

    @property
    def weights(self) -> list[torch.Tensor]:
        return [p for _, p in self.named]

    def penalty(self) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self) -> torch.Tensor:
        """``strength * penalty`` with autograd: add it to your loss."""
        return self.strength * self.penalty()

    def _add_gradient_(self, i: int, w: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """Add ``scale * d penalty / d w`` for layer ``i`` to ``grad``; return its penalty (0-d)."""
        raise NotImplementedError

    @torch.no_grad()
    def apply_gradient_(self) -> torch.Tensor:
        """Add ``strength * d penalty / d w`` to each weight's ``.grad``.

        Call it after ``loss.backward()``. Returns ``strength * penalty`` as a
        detached 0-d tensor on the weights' device (no host synchronisation).
        """
        total = None
        for i, (_, p) in enumerate(self.named):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            # elementwise ops and full reductions: any memory format works as is
            w = p.detach() if p.dtype in (torch.float32, torch.float64) else p.detach().float()
            value = self._add_gradient_(i, w, p.grad, self.strength)
            total = value if total is None else total + value
        return total * self.strength


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
        self._scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by layer index

    @property
    def lam(self) -> float:
        return self.strength

    def penalty(self) -> torch.Tensor:
        return var_penalty(self.named, self.r, self.eps)

    def _magnitudes(self, w, out=None):
        return torch.mul(w, w, out=out).add_(self.r).sqrt_()  # w~ = sqrt(w^2 + r)

    @staticmethod
    def _centre_(wt):
        """Centre magnitudes in place; return them and their population variance.

        Shifting by the first element first makes equal magnitudes exact zeros."""
        wt.sub_(wt.reshape(-1)[0].clone())
        wt.sub_(wt.mean())
        return wt, torch.linalg.vector_norm(wt).square() / wt.numel()

    def _add_gradient_(self, i, w, grad, scale):
        # scratch buffers the size of each weight: on CPU, fresh allocations of this
        # size cost more than the arithmetic (page faults)
        if i not in self._scratch or self._scratch[i][0].shape != w.shape:
            self._scratch[i] = (torch.empty_like(w), torch.empty_like(w))
        wt, q = self._scratch[i]
        self._magnitudes(w, out=wt)
        torch.div(w, wt, out=q)                      # w_i / w~_i
        e, var = self._centre_(wt)                   # w~_i - mean(w~)
        self._variances.append(var)
        inv = 1.0 / (var + self.eps)
        # d psi / d w_i = -2 / (n (V + eps)^2) * (w~_i - mean) * w_i / w~_i
        q.mul_((-2.0 * scale / w.numel()) * inv * inv)
        grad.addcmul_(e, q)
        return inv

    @torch.no_grad()
    def apply_gradient_(self) -> torch.Tensor:
        self._variances = []
        value = super().apply_gradient_()
        self.last_variances = torch.stack(self._variances)
        return value

    @torch.no_grad()
    def variances(self) -> dict[str, float]:
        """Per-layer population variance of sqrt(w^2 + r), by parameter name."""
        var = torch.stack([self._centre_(self._magnitudes(p.detach().double()))[1] for _, p in self.named])
        return {name: v for (name, _), v in zip(self.named, var.tolist())}


class L1Regularizer(Regularizer):
    """``alpha * sum |w|`` over the prunable weights."""

    name = "l1"

    def penalty(self) -> torch.Tensor:
        return l1_penalty(self.named)

    def _add_gradient_(self, i, w, grad, scale):
        grad.add_(torch.sign(w), alpha=scale)
        return torch.linalg.vector_norm(w, 1)


class HoyerSquareRegularizer(Regularizer):
    """DeepHoyer: ``alpha * sum_l (sum |w_l|)^2 / sum w_l^2``."""

    name = "Hoyer-square"

    def penalty(self) -> torch.Tensor:
        return hoyer_square_penalty(self.named)

    def _add_gradient_(self, i, w, grad, scale):
        s1 = torch.linalg.vector_norm(w, 1)
        s2 = torch.linalg.vector_norm(w, 2).square()
        # d/dw (s1^2 / s2) = 2 s1 sign(w) / s2 - 2 s1^2 w / s2^2
        grad.addcmul_(torch.sign(w), 2.0 * scale * s1 / s2)
        grad.addcmul_(w, -2.0 * scale * s1 * s1 / (s2 * s2))
        return s1 * s1 / s2
