"""Loss terms over the prunable weights: VAR, l1 and Hoyer-square.

Each regularizer has two faces:

* ``reg()`` returns ``coef * penalty`` as an autograd tensor, for users who
  add it to their loss (two lines in any training loop);
* ``reg.apply_gradient_(scale=None)`` adds ``coef * d penalty / d w`` (times
  ``scale``) to every weight's ``.grad`` after ``loss.backward()``, in closed
  form, with no autograd graph. This is the path the training loop uses.

The closed form is horizontally fused: the weights are grouped by (device,
dtype) and every step is one ``torch._foreach_*`` call over a whole group, so
the number of dispatched operations does not grow with the depth of the
network. Per-layer scalars (means, variances, coefficients) stay device
tensors, stacked into one vector per group: no ``.item()``, no Python branch
on a tensor value, hence no host synchronisation. (On CUDA the ops that
combine a full tensor with its layer's scalar, ``_foreach_*_`` with a list of
0-d tensors, take PyTorch's per-tensor fallback inside that one dispatch; the
others run as multi-tensor kernels.) Half and bfloat16 weights are computed in
float32.

VAR (arXiv 2511.14282), for each prunable tensor w with n elements::

    w~  = sqrt(w^2 + r)                      smooth |w|
    V   = mean(w~^2) - mean(w~)^2            population variance of |w|
    psi = sum over layers of 1 / (V + eps)
    d psi / d w_i = -2 / (n (V + eps)^2) * (w~_i - mean(w~)) * w_i / w~_i

Numerics: a layer whose magnitudes are all equal sits at psi's maximum, where
the true gradient is zero but rounding noise in (w~_i - mean) would be
amplified by 1/eps^2 = 1e16. Both paths are exact there: the autograd penalty
takes deviations from the layer's first magnitude (variance is shift
invariant), and the closed form takes deviations d_i = w~_i - max(w~) (exact
zeros when all magnitudes are equal, and exact by Sterbenz's lemma for every
magnitude within a factor 2 of the largest), computes the variance in two
passes from d, and zeroes the coefficient of any layer whose variance is 0.

Hoyer-square: a layer that is all zeros has 0/0; like DeepHoyer, such a layer
is skipped (it adds 0 to the value and to the gradient) in both paths.

Sharded weights (FSDP2's DTensor parameters, ``numerics/shards.py``): both
paths work on each process's shard. Each process computes its shard's
per-layer partial sums (VAR: count, largest magnitude, mean and sum of
squared deviations of ``w~`` shifted by that largest; l1: sum |w|; Hoyer:
sum |w| and sum w^2), one all-gather for all layers hands every process all
of them, each process combines them in float64 and adds the gradient of its
own shard. The value and every gradient equal one unsharded process's
(tests/test_shards.py: float64, uneven shards, an empty shard).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from varprune.numerics import shards as sh
from varprune.numerics.weights import as_weight_list

_COMPUTE_DTYPES = (torch.float32, torch.float64)


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
    shards = sh.shards_of(named)
    if shards is not None:
        var, _ = sh.combine_variance(sh.gather_rows_autograd(_var_shard_stats(named, r), shards), shards.rank)
        return (1.0 / (var + eps)).sum()
    terms = [1.0 / (_layer_variance(w, r) + eps) for _, w in named]
    return torch.stack(terms).sum()


def _var_shard_stats(named, r: float) -> torch.Tensor:
    """Per layer of the local shards: (count, largest w~, mean of w~ - largest, sum of squared deviations), float64,
    with autograd through the mean and the deviations (the shift is a constant: the variance does not depend on it)."""
    rows = []
    for _, p in named:
        w = sh.local(p)
        if w.numel() == 0:  # an empty shard: zeros, still in the graph (its .grad becomes an empty tensor, not None)
            rows.append(torch.zeros(4, dtype=torch.float64, device=w.device) + w.double().sum())
            continue
        wt = torch.sqrt(w.double().square() + r).reshape(-1)
        top = wt.max().detach()
        d = wt - top
        m = d.mean()
        e = d - m
        rows.append(torch.stack([torch.tensor(float(w.numel()), dtype=torch.float64, device=w.device), top, m, e @ e]))
    return torch.stack(rows)


def _sums(named, powers: tuple[int, ...]) -> torch.Tensor:
    """``(layers, len(powers))``: sum |w|^k of each weight over the whole layer (all shards), with autograd."""
    rows = [torch.stack([sh.local(w).abs().pow(k).sum() for k in powers]) for _, w in named]
    local = torch.stack(rows)
    shards = sh.shards_of(named)
    if shards is None:
        return local
    return sh.gather_rows_autograd(local.double(), shards).sum(0)


def l1_penalty(weights) -> torch.Tensor:
    """sum over all prunable weights of |w|."""
    return _sums(as_weight_list(weights), (1,)).sum()


def hoyer_square_penalty(weights) -> torch.Tensor:
    """DeepHoyer's Hoyer-square, per layer: sum_l (sum |w_l|)^2 / sum w_l^2.

    A layer that is all zeros (0/0) is skipped: it contributes 0 to the value
    and to the gradient, as in DeepHoyer, instead of NaN.
    """
    s1, s2 = _sums(as_weight_list(weights), (1, 2)).unbind(1)
    ok = s2 > 0
    # the inner where keeps 0/0 out of the graph: a NaN in the unselected
    # branch would still poison the gradient
    safe = torch.where(ok, s2, torch.ones_like(s2))
    return torch.where(ok, s1 * s1 / safe, torch.zeros_like(s2)).sum()


class _Group:
    """Weights sharing one device and dtype, in their original order."""

    def __init__(self, indices: list[int], params: list[torch.Tensor], sharded: bool = False):
        self.indices = indices
        self.sharded = sharded  # DTensor parameters: ``params`` are this process's shards (see ``refresh``)
        self.whole = params
        self.params = [sh.local(p).detach() for p in params] if sharded else params
        self.device = self.params[0].device
        self.dtype = self.params[0].dtype
        self.compute_dtype = self.dtype if self.dtype in _COMPUTE_DTYPES else torch.float32
        self.inv_numel = 1.0 / torch.tensor([p.numel() for p in params], dtype=self.compute_dtype, device=self.device)
        self.scratch: list[list[torch.Tensor]] | None = None  # regularizer-owned buffers
        # sharded: the layers whose shard here is not empty, and their element counts here (made once: no
        # host-to-device copy in the step)
        self.present = [i for i, p in enumerate(self.params) if p.numel() > 0]
        self.present_index = torch.tensor(self.present, dtype=torch.long, device=self.device)
        self.local_counts = torch.tensor(
            [float(self.params[i].numel()) for i in self.present], dtype=self.compute_dtype, device=self.device
        )
        self.last_var: torch.Tensor | None = None  # VAR: per-layer variances of the last closed-form pass

    def refresh(self) -> None:
        """Sharded: take the shards again (FSDP2 may swap a parameter's local tensor, e.g. on loading a state)."""
        if self.sharded:
            self.params = [sh.local(p).detach() for p in self.whole]

    def grads(self) -> list[torch.Tensor]:
        out = []
        for p in self.whole:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            out.append(sh.local(p.grad) if self.sharded else p.grad)
        return out

    def buffers(self, count: int) -> list[list[torch.Tensor]]:
        """``count`` lists of scratch tensors shaped like the weights, kept between calls.

        On CPU, fresh allocations the size of the weights cost more than the
        arithmetic (page faults); on CUDA they would only be cache hits."""
        if (
            self.scratch is None
            or len(self.scratch) < count
            or any(b.shape != p.shape for b, p in zip(self.scratch[0], self.params))
        ):
            self.scratch = [[torch.empty_like(p, dtype=self.compute_dtype) for p in self.params] for _ in range(count)]
        return self.scratch[:count]


def _signature(params) -> tuple:
    return tuple((p.device, p.dtype, p.shape) for p in params)


def _group_by_device_dtype(params: list[torch.Tensor], sharded: bool = False) -> list[_Group]:
    keys: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        keys.setdefault((p.device, p.dtype), []).append(i)
    return [_Group(idx, [params[i] for i in idx], sharded) for idx in keys.values()]


def _check_scale(scale):
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype.is_complex or scale.dtype == torch.bool:
            raise ValueError(
                f"apply_gradient_: scale must be a float or a one-element tensor, "
                f"got a tensor of shape {tuple(scale.shape)}"
            )
        return scale.reshape(())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"apply_gradient_: scale must be a float or a one-element tensor, got {scale!r}")
    return float(scale)


def _coefficient(coef: float, scale, group: _Group):
    """``coef * scale`` as a Python float, or as a 0-d tensor on the group's device."""
    if scale is None:
        return coef
    if isinstance(scale, float):
        return coef * scale
    return scale.to(device=group.device, dtype=group.compute_dtype, non_blocking=True) * coef


class Regularizer:
    """Base class: a penalty over prunable weights, multiplied by ``coef``.

    Subclasses implement ``penalty()`` (autograd) and ``_group_gradient_``
    (closed form over one device/dtype group of weights).
    """

    name = "regularizer"

    def __init__(self, model_or_weights, strength: float):
        strength = float(strength)
        if not strength >= 0 or strength == float("inf"):
            raise ValueError(f"{self.name} strength must be a finite number >= 0, got {strength}")
        if isinstance(model_or_weights, nn.Module):
            sh.refuse_unsupported(model_or_weights, self.name)
        self.named = as_weight_list(model_or_weights)
        if not self.named:
            raise ValueError(f"{self.name}: the model has no prunable weights")
        self._shards = sh.shards_of(self.named)  # None: whole tensors
        self.coef = strength
        self._groups: list[_Group] = []
        self._signature: tuple | None = None
        self._order: torch.Tensor | None = None

    @property
    def strength(self) -> float:
        """The multiplier of the penalty (l1's and Hoyer's alpha)."""
        return self.coef

    @property
    def weights(self) -> list[torch.Tensor]:
        return [p for _, p in self.named]

    def penalty(self) -> torch.Tensor:
        """The penalty over the weights, without ``coef``, with autograd."""
        raise NotImplementedError

    def __call__(self) -> torch.Tensor:
        """``coef * penalty`` with autograd: add it to your loss."""
        return self.coef * self.penalty()

    def _group_gradient_(self, group: _Group, grads: list[torch.Tensor], coef) -> torch.Tensor:
        """Add ``coef * d penalty / d w`` to ``grads``; return the group's per-layer penalties (1-D)."""
        raise NotImplementedError

    def _current_groups(self) -> list[_Group]:
        params = self.weights
        sig = _signature(params)
        if sig != self._signature:  # first call, or the model moved to another device/dtype
            self._groups = _group_by_device_dtype(params, self._shards is not None)
            self._signature = sig
            perm = [i for g in self._groups for i in g.indices]
            self._order = (
                None
                if perm == list(range(len(perm)))
                else torch.argsort(torch.tensor(perm, device=self._groups[0].device))
            )
        else:
            for g in self._groups:
                g.refresh()
        return self._groups

    def _ordered(self, per_group: list[torch.Tensor]) -> torch.Tensor:
        """Per-layer values of every group, back in the weights' order, on the first weight's device."""
        device = self._groups[0].device
        flat = torch.cat([v.to(device) for v in per_group]) if len(per_group) > 1 else per_group[0]
        return flat if self._order is None else flat[self._order]

    @torch.no_grad()
    def apply_gradient_(self, scale=None) -> torch.Tensor:
        """Add ``coef * d penalty / d w * scale`` to each weight's ``.grad``.

        Call it after ``loss.backward()``. ``scale`` (optional) is a float or a
        one-element tensor, e.g. a ``torch.amp.GradScaler``'s current scale as
        ``scaler.scale(torch.ones((), device=d))``: the added gradient is then
        scaled like the loss's, and ``scaler.unscale_``/``scaler.step`` see the
        sum of both at the same scale. Returns ``coef * penalty`` (not scaled)
        as a detached 0-d tensor on the first weight's device, with no host
        synchronisation.
        """
        scale = _check_scale(scale)
        groups = self._current_groups()
        if self._shards is None:
            values = [self._group_gradient_(g, g.grads(), _coefficient(self.coef, scale, g)) for g in groups]
        else:
            values = self._sharded_gradient_(groups, scale, self._shards)
        self._last_terms = self._ordered(values)
        return self._last_terms.sum() * self.coef

    def _sharded_gradient_(self, groups: list[_Group], scale, shards: sh.Shards) -> list[torch.Tensor]:
        """Every group's local partial sums, one all-gather for all layers, then each group's shard gradient.

        One collective, an all-gather rather than all-reduces: VAR's shift (the layer's largest magnitude) would
        need a MAX reduction before the SUM of the shifted sums, two collectives in sequence; gathered, each
        shard's partials keep its own shift and every process combines them in the same order (Chan's update,
        ``shards.combine_variance``), so all processes get the same bits. A few scalars per layer and process."""
        local = [self._shard_stats_(g) for g in groups]
        device = groups[0].device
        gathered = sh.gather_rows(torch.cat([t.to(device, torch.float64) for t in local]), shards)
        parts = gathered.split([t.shape[0] for t in local], dim=1)
        return [
            self._shard_gradient_(g, g.grads(), _coefficient(self.coef, scale, g), part.to(g.device), shards.rank)
            for g, part in zip(groups, parts)
        ]

    def _shard_stats_(self, group: _Group) -> torch.Tensor:
        """``(layers, k)``: this process's partial sums of the group's layers (its shards: ``group.params``)."""
        raise NotImplementedError

    def _shard_gradient_(self, group: _Group, grads, coef, gathered: torch.Tensor, rank: int) -> torch.Tensor:
        """From every shard's partials ``(world, layers, k)``: add the gradient of this shard; per-layer penalties."""
        raise NotImplementedError


class VarRegularizer(Regularizer):
    """The Variance Amplifying Regularizer: ``lam * sum_l 1 / (Var(|w_l|) + eps)``.

    Two-line use in your own loop:

    ```python
    reg = VarRegularizer(model, lam=1e-6)
    loss = criterion(model(x), y) + reg()        # autograd path
    # or, faster: loss.backward(); reg.apply_gradient_()
    ```

    Or state the strength relative to the penalty at initialisation:
    ``VarRegularizer.from_strength(model, 0.1)`` chooses ``lam`` so that
    ``lam * psi(w_init) == 0.1``.

    Attributes: ``lam`` (the multiplier), ``strength`` (``lam * psi`` at the
    weights given at construction), ``psi_init`` (that psi),
    ``last_variances`` (per-layer variances from the last
    ``apply_gradient_``, a device tensor). ``reg.variances()`` gives the
    per-layer variance of |w| by name (for logging; a host read).
    """

    name = "VAR"

    def __init__(self, model_or_weights, lam: float, r: float = 1e-8, eps: float = 1e-8):
        r, eps = self.check_constants(r, eps)
        super().__init__(model_or_weights, lam)
        self.r = r
        self.eps = eps
        self.last_variances: torch.Tensor | None = None
        # psi at the weights given, in float64: one host read, at construction
        self.psi_init = float((1.0 / (self._variances64() + self.eps)).sum())
        self._strength: float | None = None

    @staticmethod
    def check_constants(r, eps) -> tuple[float, float]:
        """``(r, eps)`` as floats, or a ValueError unless each is a finite real number > 0.

        The one check of VAR's smoothing constants, also run by the trainer
        callbacks when they are made: ``eps = inf`` makes every term
        ``1 / (V + eps)`` exactly 0 (training silently without VAR), NaN makes
        it NaN, and ``r <= 0`` leaves ``sqrt(w^2 + r)`` without its smoothing
        at 0 (a 0/0 in the gradient)."""
        for name, value in (("r", r), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
                raise ValueError(f"VAR's {name} must be a finite number > 0, got {value!r}")
        return float(r), float(eps)

    @classmethod
    def from_strength(cls, model_or_weights, strength: float, r: float = 1e-8, eps: float = 1e-8) -> VarRegularizer:
        """A VarRegularizer with ``lam = strength / psi(w)``, psi taken once on the weights given.

        Pass the model (or weights) at initialisation: ``strength`` is then
        the VAR term's value at the start of training, comparable across
        models whose psi differs by orders of magnitude. The resolved values
        are ``reg.lam`` and ``reg.strength``.
        """
        strength = float(strength)
        if not 0 <= strength < float("inf"):
            raise ValueError(f"VAR strength must be a finite number >= 0, got {strength}")
        reg = cls(model_or_weights, 0.0, r=r, eps=eps)
        if not 0 < reg.psi_init < float("inf"):
            raise ValueError(f"VAR: psi of the given weights is {reg.psi_init}; the weights must be finite")
        reg.coef = strength / reg.psi_init
        reg._strength = strength
        return reg

    @property
    def lam(self) -> float:
        """The multiplier lambda of psi."""
        return self.coef

    @property
    def strength(self) -> float:
        """``lam * psi`` at the weights given at construction (exactly the value given to ``from_strength``)."""
        return self._strength if self._strength is not None else self.coef * self.psi_init

    def penalty(self) -> torch.Tensor:
        """psi(w), with autograd (``reg()`` is ``lam * reg.penalty()``)."""
        return var_penalty(self.named, self.r, self.eps)

    def _group_gradient_(self, group, grads, coef):
        t, q = group.buffers(2)
        torch._foreach_copy_(t, group.params)
        torch._foreach_mul_(t, t)
        torch._foreach_add_(t, self.r)
        torch._foreach_sqrt_(t)  # t = w~
        torch._foreach_copy_(q, group.params)
        torch._foreach_div_(q, t)  # q = w / w~
        torch._foreach_sub_(t, torch._foreach_max(t))  # t = d = w~ - max(w~) <= 0
        inv_n = group.inv_numel
        mean = torch.stack(torch._foreach_norm(t, 1)) * inv_n  # -mean(d)
        torch._foreach_add_(t, list(mean.unbind()))  # t = e = d - mean(d) = w~ - mean(w~)
        var = torch.stack(torch._foreach_norm(t, 2)).square() * inv_n
        inv = (var + self.eps).reciprocal()
        # d psi / d w_i = -2 / (n (V + eps)^2) * e_i * q_i; exactly 0 when V == 0
        c = torch.where(var > 0, inv * inv * (inv_n * (-2.0 * coef)), 0.0)
        torch._foreach_mul_(q, list(c.unbind()))
        torch._foreach_addcmul_(grads, t, q)
        group.last_var = var
        return inv

    def _shard_stats_(self, group):
        # per layer of this shard: (count, top = max w~, m = mean(w~ - top), M2 = sum (w~ - top - m)^2); an empty
        # shard has a row of zeros (the max of nothing is undefined: it is left out of the fused calls)
        rows = torch.zeros(len(group.params), 4, dtype=group.compute_dtype, device=group.device)
        present = group.present
        if not present:
            return rows
        t, q = ([b[i] for i in present] for b in group.buffers(2))
        params = [group.params[i] for i in present]
        torch._foreach_copy_(t, params)
        torch._foreach_mul_(t, t)
        torch._foreach_add_(t, self.r)
        torch._foreach_sqrt_(t)  # t = w~
        torch._foreach_copy_(q, params)
        torch._foreach_div_(q, t)  # q = w / w~
        top = torch.stack(torch._foreach_norm(t, float("inf")))  # w~ > 0: its largest
        torch._foreach_sub_(t, list(top.unbind()))
        count = group.local_counts
        mean = torch.stack(torch._foreach_norm(t, 1)) / -count
        torch._foreach_sub_(t, list(mean.unbind()))  # t = w~ - top - mean: this shard's deviations
        m2 = torch.stack(torch._foreach_norm(t, 2)).square()
        return rows.index_copy_(0, group.present_index, torch.stack([count, top, mean, m2], 1))

    def _shard_gradient_(self, group, grads, coef, gathered, rank):
        var, correction = sh.combine_variance(gathered, rank)  # float64; correction: to w~ - mean(w~)
        inv = (var + self.eps).reciprocal()
        c = torch.where(var > 0, inv * inv * (group.inv_numel.double() * (-2.0 * coef)), 0.0)
        present, index = group.present, group.present_index
        if present:
            t, q = ([b[i] for i in present] for b in group.buffers(2))
            torch._foreach_add_(t, list(correction.index_select(0, index).to(group.compute_dtype).unbind()))
            torch._foreach_mul_(q, list(c.index_select(0, index).to(group.compute_dtype).unbind()))
            torch._foreach_addcmul_([grads[i] for i in present], t, q)
        group.last_var = var.to(group.compute_dtype)
        return inv.to(group.compute_dtype)

    @torch.no_grad()
    def apply_gradient_(self, scale=None) -> torch.Tensor:
        """Add ``lam * d psi / d w * scale`` to each weight's ``.grad`` (as every regularizer does, see the base
        class), keeping the per-layer variances in ``last_variances``; returns ``lam * psi``, detached."""
        value = super().apply_gradient_(scale)
        self.last_variances = self._ordered([g.last_var for g in self._groups if g.last_var is not None])
        return value

    @torch.no_grad()
    def _variances64(self) -> torch.Tensor:
        if self._shards is not None:  # one all-gather of every layer's partials: every process gets every variance
            stats = sh.gather_rows(_var_shard_stats(self.named, self.r), self._shards)
            return sh.combine_variance(stats, self._shards.rank)[0]
        out, device = [], self.named[0][1].device
        for _, p in self.named:
            wt = torch.sqrt(p.detach().double().square() + self.r).reshape(-1)
            d = wt - wt.max()
            out.append((d - d.mean()).square().mean().to(device))
        return torch.stack(out)

    def variances(self) -> dict[str, float]:
        """Per-layer population variance of sqrt(w^2 + r), in float64, by parameter name."""
        return {name: v for (name, _), v in zip(self.named, self._variances64().tolist())}


class L1Regularizer(Regularizer):
    """``alpha * sum |w|`` over the prunable weights."""

    name = "l1"

    def penalty(self) -> torch.Tensor:
        return l1_penalty(self.named)

    def _group_gradient_(self, group, grads, coef):
        self._add_sign_(group, grads, coef)
        return self._shard_stats_(group)[:, 0]

    @staticmethod
    def _add_sign_(group, grads, coef):
        sign = torch._foreach_sign(group.params)
        if isinstance(coef, torch.Tensor):
            torch._foreach_mul_(sign, coef.to(group.dtype))
            torch._foreach_add_(grads, sign)
        else:
            torch._foreach_add_(grads, sign, alpha=coef)

    def _shard_stats_(self, group):
        dtype = None if group.dtype == group.compute_dtype else group.compute_dtype
        return torch.stack(torch._foreach_norm(group.params, 1, dtype=dtype)).unsqueeze(1)

    def _shard_gradient_(self, group, grads, coef, gathered, rank):
        self._add_sign_(group, grads, coef)  # sign(w) needs nothing from the other shards
        return gathered[..., 0].sum(0).to(group.compute_dtype)


class HoyerSquareRegularizer(Regularizer):
    """DeepHoyer: ``alpha * sum_l (sum |w_l|)^2 / sum w_l^2``; all-zero layers contribute 0."""

    name = "Hoyer-square"

    def penalty(self) -> torch.Tensor:
        return hoyer_square_penalty(self.named)

    def _group_gradient_(self, group, grads, coef):
        s1, s2 = self._shard_stats_(group).unbind(1)
        return self._apply_(group, grads, coef, s1, s2)

    def _shard_stats_(self, group):
        dtype = None if group.dtype == group.compute_dtype else group.compute_dtype
        s1 = torch.stack(torch._foreach_norm(group.params, 1, dtype=dtype))
        s2 = torch.stack(torch._foreach_norm(group.params, 2, dtype=dtype)).square()
        return torch.stack([s1, s2], 1)

    def _shard_gradient_(self, group, grads, coef, gathered, rank):
        s1, s2 = gathered.sum(0).unbind(1)  # float64: the whole layer's sum |w| and sum w^2
        return self._apply_(group, grads, coef, s1, s2).to(group.compute_dtype)

    @staticmethod
    def _apply_(group, grads, coef, s1, s2):
        ok = s2 > 0
        s2 = torch.where(ok, s2, torch.ones_like(s2))  # all-zero layers: skipped below
        zero = torch.zeros_like(s2)
        # d/dw (s1^2 / s2) = 2 s1 sign(w) / s2 - 2 s1^2 w / s2^2
        a = torch.where(ok, (2.0 * coef) * s1 / s2, zero)
        b = torch.where(ok, (-2.0 * coef) * s1 * s1 / (s2 * s2), zero)
        a, b = (v.to(group.compute_dtype) for v in (a, b))
        torch._foreach_addcmul_(grads, torch._foreach_sign(group.params), list(a.unbind()))
        torch._foreach_addcmul_(grads, group.params, list(b.unbind()))
        return torch.where(ok, s1 * s1 / s2, zero)
