"""Sharpness- and compression-aware optimizers: SAM/ASAM, CrAM/CrAM+, S2-SAM.

Each class wraps a base optimizer (``torch.optim.SGD`` in varprune) that does
the actual update; the wrapper only decides *where* the gradient is taken
(the papers: docs/background.md). The base optimizer is built on the wrapper's
own ``param_groups`` (the same dicts), so an LR scheduler attached to
``opt.base_optimizer`` and a write to ``opt.param_groups[i]["lr"]`` are the
same thing.

Calling protocol (``caller_runs_first_pass`` tells a training loop which)::

    # SAM, ASAM, CrAM, CrAM+            (caller_runs_first_pass = True)
    opt.zero_grad()
    criterion(model(x), y).backward()            # gradient at w, left in .grad
    def closure():
        with frozen_bn_stats(model):             # BN statistics come from the first pass only
            loss = criterion(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)                            # returns the closure's loss

    # S2-SAM                            (caller_runs_first_pass = False)
    def closure():                               # the one and only pass of the step
        loss = criterion(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)

    # plain torch optimizers            (no attribute)
    opt.zero_grad(); criterion(model(x), y).backward(); opt.step()

fp16 with a GradScaler: scale every backward (the caller's and the closure's)
with ``scaler.scale(loss).backward()``, call ``opt.step(closure, scaler=scaler)``
instead of ``scaler.step(opt)``, then ``scaler.update()`` as usual. Do not call
``scaler.unscale_(opt)`` yourself. The step unscales each pass, and a
non-finite gradient in *any* pass makes the scaler skip the update and lower
its scale, as in one-pass training. bf16 autocast needs nothing.

Under DDP the caller's first backward must be synchronised for CrAM+ (its
dense gradient enters the update); for SAM the popular recipe wraps it in
``model.no_sync()`` and perturbs with the local gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from varprune.numerics import shards as sh
from varprune.numerics.pruning import keep_mask_topk

__all__ = ["S2SAM", "SAM", "CrAM", "frozen_bn_stats", "is_two_pass"]


# Keeps rho * g / ||g|| finite when every gradient is zero (a frozen model, a dead batch).
_EPS = 1e-12


def is_two_pass(optimizer: torch.optim.Optimizer) -> bool:
    """True when the caller runs the first forward+backward and then ``step(closure)``.

    SAM and CrAM: True. S2-SAM: False (it needs ``step(closure)`` and no first
    pass). A plain torch optimizer: False (it needs a first pass and ``step()``);
    tell those apart with ``getattr(opt, "caller_runs_first_pass", None) is None``.
    """
    return bool(getattr(optimizer, "caller_runs_first_pass", False))


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Run forward passes that use batch statistics but leave running statistics alone.

    SAM and CrAM evaluate the loss at perturbed (or compressed) weights; those
    batch statistics must not leak into the running averages used at test
    time. The popular recipe sets BN momentum to 0; this turns
    ``track_running_stats`` off instead, which has the same forward in train
    mode (batch statistics) and eval mode (running statistics) but is also
    exact for ``momentum=None`` (cumulative averaging would otherwise still
    advance ``num_batches_tracked``) and for non-finite batches (``0 * nan``
    is nan, so momentum 0 would write nan into the running stats). Restored on
    exit, exception included.
    """
    changed = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        for m in changed:
            m.track_running_stats = False
        yield model
    finally:
        for m in changed:
            m.track_running_stats = True


def _accumulation_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    # Norms and magnitude orders in float32 at least (bf16/fp16 sums lose too much), float64 when given.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _global_norm(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm over all tensors, as a 0-dim tensor on ``device`` (no host sync).

    Sharded (FSDP2's DTensor gradients): each process's shards' sum of squares, one all-reduce, the same norm on
    every process as one unsharded process's (up to the order of the sum)."""
    dtype = _accumulation_dtype(tensors)
    shards = sh.group_of(tensors)
    norms = [torch.linalg.vector_norm(sh.local(t), dtype=dtype).to(device) for t in tensors]
    if not norms:
        return torch.zeros((), dtype=dtype, device=device)
    if shards is None:
        return torch.linalg.vector_norm(torch.stack(norms))
    squares = torch.stack(norms).square()
    split = torch.tensor([sh.is_dtensor(t) for t in tensors], device=device)
    sharded = torch.where(split, squares, 0.0).sum()
    dist.all_reduce(sharded, group=shards.group)  # whole (replicated) tensors are counted once, after it
    return (sharded + torch.where(split, 0.0, squares).sum()).sqrt()


def _keep_masks(
    tensors: Sequence[torch.Tensor], sparsity: float, dtype: torch.dtype = torch.bool, buffers: dict | None = None
) -> list[torch.Tensor]:
    """Global magnitude keep-masks (True = kept) zeroing exactly ``round(sparsity * N)`` entries.

    Ties go by position (the earlier of two equal magnitudes is pruned first,
    as a stable argsort would) so the realised sparsity is always the
    requested one. The selection is [`keep_mask_topk`][varprune.numerics.pruning.keep_mask_topk]:
    a histogram radix-select on the magnitudes' bit patterns on CPU, an
    integer sort without host synchronisation elsewhere. ``dtype``: bool, or
    a floating dtype for 0/1 masks to multiply by. ``buffers``: a dict the
    caller keeps between calls; the magnitudes and the mask are written into
    tensors kept there (the masks returned are views of it, valid until the
    next call), which spares two large allocations per call.
    """
    if not tensors:
        return []
    device = tensors[0].device
    magnitude_dtype = _accumulation_dtype(tensors)
    sizes = [t.numel() for t in tensors]
    flat = _buffer(buffers, "magnitudes", sum(sizes), magnitude_dtype, device)
    for piece, t in zip(flat.split(sizes), tensors):
        t = t.detach().reshape(-1).to(device)
        if t.dtype == magnitude_dtype:
            torch.abs(t, out=piece)
        else:
            piece.copy_(t).abs_()
    keep = keep_mask_topk(
        flat, round(sparsity * flat.numel()), dtype=dtype, out=_buffer(buffers, "mask", flat.numel(), dtype, device)
    )
    return [piece.view(t.shape).to(t.device) for piece, t in zip(keep.split(sizes), tensors)]


def _buffer(buffers: dict | None, name: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``buffers[name]`` if it fits (n, dtype, device), else a new tensor stored there (or just returned)."""
    t = None if buffers is None else buffers.get(name)
    if t is None or t.numel() != n or t.dtype != dtype or t.device != device:
        t = torch.empty(n, dtype=dtype, device=device)
        if buffers is not None:
            buffers[name] = t
    return t


class _Scaling:
    """What ``step(closure, scaler=...)`` needs from a GradScaler, through its public API only.

    Each pass's gradients are unscaled here (a GradScaler lets ``unscale_`` run
    once per optimizer per step, and a two-pass step has two scaled passes).
    The final gradient is scaled back and handed to ``scaler.step(base)``, so
    the scaler itself decides skip-or-step and records what ``update()`` needs.
    """

    def __init__(self, scaler, device: torch.device):
        self.scaler = scaler
        # scaler.scale() of a one is the current scale as a device tensor: no host sync, no private field
        self.scale = scaler.scale(torch.ones((), dtype=torch.float32, device=device))
        self.inv_scale = self.scale.double().reciprocal().float()  # as GradScaler computes it
        self.finite = torch.ones((), dtype=torch.bool, device=device)

    @classmethod
    def create(cls, scaler, device: torch.device) -> _Scaling | None:
        if scaler is None or not scaler.is_enabled():
            return None
        return cls(scaler, device)

    def unscale_(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(self.inv_scale.to(p.grad.device))
                self.finite &= torch.isfinite(p.grad).all().to(self.finite.device)

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
        # A non-finite earlier pass may not show in the final gradient (SAM's is the second pass alone):
        # poisoning it with nan makes the scaler skip the step and back off, without a host sync here.
        factor = torch.where(self.finite, self.scale, torch.full_like(self.scale, float("nan")))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor.to(p.grad.device))
        self.scaler.step(optimizer)


class _Wrapper(torch.optim.Optimizer):
    """Shared plumbing: the base optimizer, closure checks, and a resumable state_dict."""

    caller_runs_first_pass = True

    def __init__(self, params, base_optimizer_cls, own_defaults: dict, base_kwargs: dict):
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError(
                f"base_optimizer_cls must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), "
                f"got {base_optimizer_cls!r}"
            )
        if own_defaults.get("rho", 0.0) < 0:
            raise ValueError(f"rho must be >= 0, got {own_defaults['rho']}")
        self._own_defaults = dict(own_defaults)
        # callables run at w, just before the base step, with the final gradient in .grad: per instance, so a hook
        # added to one optimizer never runs inside another's step
        self.final_gradient_hooks: list[Callable[[], object]] = []
        super().__init__(params, {**own_defaults, **base_kwargs})
        # The base adds its defaults to the very dicts in self.param_groups: one set of groups, two views.
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # during Optimizer.__init__
            return super().add_param_group(param_group)
        for key, value in self._own_defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for p in self._params() if p.grad is not None]

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _check_closure(self, closure: Callable | None) -> Callable:
        if closure is None:
            if self.caller_runs_first_pass:
                how = (
                    "run the first forward+backward yourself, then call step(closure) with a closure that "
                    "runs forward+backward again (inside frozen_bn_stats(model)) and returns the loss"
                )
            else:
                how = (
                    "call step(closure) with a closure that runs the step's only forward+backward and returns "
                    "the loss; do not run a pass before it"
                )
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure: {how}")
        return closure

    def _base_step(self, scaling: _Scaling | None) -> None:
        # Hooks see the weights restored to w and the final (unscaled) gradient in .grad: a training loop
        # adds its regularizers' gradients here, once, at w (see loop.make_train_step).
        for hook in self.final_gradient_hooks:
            hook()
        if scaling is None:
            self.base_optimizer.step()
        else:
            scaling.step(self.base_optimizer, self._params())

    # -- checkpointing ---------------------------------------------------------------------------
    # torch's Optimizer.state_dict would only hold the wrapper's (mostly empty) state; the base
    # optimizer's buffers (momentum) must come along or a resumed run is not the same run.

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        own = super().state_dict()
        return {
            "state": own["state"],
            "param_groups": own["param_groups"],
            "base_state": self.base_optimizer.state_dict()["state"],
            "extra": {"optimizer": type(self).__name__, **self._extra_state()},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        missing = sorted({"state", "param_groups", "base_state", "extra"} - set(state_dict))
        if missing:
            raise ValueError(
                f"not a {type(self).__name__} state dict (missing {', '.join(missing)}); "
                f"a plain optimizer's state cannot be loaded into a wrapper"
            )
        saved_by = state_dict["extra"].get("optimizer")
        if saved_by != type(self).__name__:
            raise ValueError(f"state dict was saved by {saved_by}, cannot load it into {type(self).__name__}")
        groups = state_dict["param_groups"]
        super().load_state_dict({"state": state_dict["state"], "param_groups": groups})
        self.base_optimizer.load_state_dict({"state": state_dict["base_state"], "param_groups": groups})
        # Both loads built fresh group dicts; share one list again so lr changes reach the base.
        self.base_optimizer.param_groups = self.param_groups
        self._load_extra_state(state_dict["extra"])


class SAM(_Wrapper):
    """Sharpness-Aware Minimization (Foret et al. 2021); ASAM with ``adaptive=True``.

    e = rho * g / ||g||, or for ASAM e = rho * w^2 * g / || |w| * g ||, the
    norm taken over every parameter that has a gradient. The gradient at w + e
    is then applied at w by the base optimizer. Two passes per step; see the
    module docstring for the protocol. ``first_step``/``second_step`` are
    public for loops that want to drive the two halves themselves (no scaler
    support there).
    """

    def __init__(self, params, base_optimizer_cls, rho: float = 0.05, adaptive: bool = False, **base_kwargs):
        super().__init__(params, base_optimizer_cls, dict(rho=rho, adaptive=adaptive), base_kwargs)
        self._backup: dict[torch.Tensor, torch.Tensor] | None = None  # w, between first_step and second_step

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient from w to w + e."""
        params = self._params_with_grad()
        device = self._device()
        # sharded parameters (FSDP2): every product below is elementwise, so each process works on its shards
        scaled = [
            (torch.abs(p) * p.grad if group["adaptive"] else p.grad)
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        grad_norm = _global_norm(scaled, device)
        del scaled
        self._backup = {p: p.detach().clone() for p in params}
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + _EPS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                w = sh.local(p)
                e = sh.local(p.grad) * scale.to(device=w.device, dtype=w.dtype)
                if group["adaptive"]:
                    e.mul_(w * w)
                w.add_(e)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, _scaling: _Scaling | None = None) -> None:
        """Return to w (bitwise) and let the base optimizer apply the gradient taken at w + e."""
        if self._backup is None:
            raise RuntimeError("SAM.second_step() called without a first_step() before it")
        for p, w in self._backup.items():
            p.copy_(w)
        self._backup = None
        self._base_step(_scaling)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, scaler=None):
        """The gradient at w is in .grad (the caller's pass); ``closure`` runs the pass at w + e."""
        closure = self._check_closure(closure)
        scaling = _Scaling.create(scaler, self._device())
        if scaling is not None:
            scaling.unscale_(self._params())
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        if scaling is not None:
            scaling.unscale_(self._params())
        self.second_step(_scaling=scaling)
        return loss


class CrAM(_Wrapper):
    """Compression-aware minimizer (Peste et al., ICLR 2023): CrAM, CrAM+ and CrAM+-Multi.

    With g = grad f(w) in .grad (the caller's pass): w' = w + rho * g
    (g / ||g|| if ``normalize``); draw one sparsity k from ``sparsities``
    (uniformly, from a generator seeded by ``seed`` and saved in the state
    dict); M = global magnitude keep-mask of w' over the compressed tensors,
    zeroing exactly round(k * N) weights; g'' = grad f(M * w') from the
    closure; update at w with M * g'' + g (``plus=True``, CrAM+) or M * g''
    (``plus=False``, CrAM). Masking g'' is the reference implementation's
    default (IST-DASLab/CrAM, ``sparse_grad=True``) for both variants;
    ``sparse_grad=False`` uses the unmasked g'' (CrAM: g''; CrAM+: g'' + g).

    The compressed tensors are ``compress_params`` when given (e.g. only the
    conv/linear weights that varprune prunes), else every parameter with
    ndim >= 2. Other parameters are perturbed but not masked (M = 1).
    ``last_sparsity`` holds the k of the latest step, for logging. FSDP2-sharded parameters (DTensors): the
    mask is selected over every process's shards (``shards.keep_masks``), each process's part of the
    one-process mask.
    """

    def __init__(
        self,
        params,
        base_optimizer_cls,
        rho: float = 0.05,
        sparsities: Sequence[float] = (0.5,),
        plus: bool = True,
        normalize: bool = False,
        seed: int = 0,
        compress_params: Iterable[torch.Tensor] | None = None,
        sparse_grad: bool = True,
        **base_kwargs,
    ):
        sparsities = tuple(float(s) for s in sparsities)
        if not sparsities:
            raise ValueError("CrAM needs at least one sparsity")
        bad = [s for s in sparsities if not 0.0 <= s < 1.0]
        if bad:
            raise ValueError(f"CrAM sparsities must be in [0, 1), got {bad}")
        super().__init__(params, base_optimizer_cls, dict(rho=rho), base_kwargs)
        self._shards = sh.group_of(self._params())  # FSDP2: the mask is selected over every process's shards
        self.sparsities = sparsities
        self.plus = bool(plus)
        self.sparse_grad = bool(sparse_grad)
        self.normalize = bool(normalize)
        self.seed = int(seed)
        self.last_sparsity: float | None = None
        self._buffers: dict = {}  # the top-k's magnitudes and mask, reused every step
        # CPU generator: drawing k never syncs with an accelerator
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        own = self._params()
        if compress_params is None:
            self._compressed = [p for p in own if p.dim() >= 2]
        else:
            ids = {id(p) for p in own}
            self._compressed = list(compress_params)
            if any(id(p) not in ids for p in self._compressed):
                raise ValueError("compress_params must be parameters handed to this optimizer")

    def draw_sparsity(self) -> float:
        """Draw this step's k (one draw per step, even with a single sparsity, so sequences stay aligned)."""
        i = int(torch.randint(len(self.sparsities), (1,), generator=self._generator))
        return self.sparsities[i]

    @torch.no_grad()
    def step(self, closure: Callable | None = None, scaler=None):
        """The gradient at w is in .grad (the caller's pass); ``closure`` runs the pass at M * w'."""
        closure = self._check_closure(closure)
        device = self._device()
        scaling = _Scaling.create(scaler, device)
        if scaling is not None:
            scaling.unscale_(self._params())
        # g at w; the closure gets fresh .grad tensors
        first: dict[torch.Tensor, torch.Tensor] = {p: p.grad for p in self._params_with_grad() if p.grad is not None}
        compressed_ids = {id(p) for p in self._compressed}
        backup = {p: p.detach().clone() for p in self._params() if p.grad is not None or id(p) in compressed_ids}

        norm = _global_norm(list(first.values()), device) if self.normalize else None
        for group in self.param_groups:
            for p in group["params"]:
                g = first.get(p)
                if g is None:
                    continue
                if norm is None:
                    p.add_(g, alpha=group["rho"])
                else:
                    p.add_(g * (group["rho"] / (norm + _EPS)).to(device=p.device, dtype=p.dtype))

        self.last_sparsity = k = self.draw_sparsity()
        # M from |w'|, as in the paper, as 0/1 in the weights' dtype: on CPU a multiply by it is several
        # times cheaper than masked_fill_ or a multiply by a bool mask
        dtypes = {p.dtype for p in self._compressed}
        mask_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if self._shards is None:
            selected = _keep_masks(self._compressed, k, mask_dtype, self._buffers)
        else:  # sharded: this process's part of the one-process mask (numerics/shards.py)
            n = sum(p.numel() for p in self._compressed)
            local = [sh.local(p).detach().abs() for p in self._compressed]
            selected = sh.keep_masks(local, round(k * n), self._shards, mask_dtype)
        masks = dict(zip(self._compressed, selected))
        for p, m in masks.items():
            sh.local(p).mul_(m)

        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        if scaling is not None:
            scaling.unscale_(self._params())

        for p, w in backup.items():
            g2: torch.Tensor | None = p.grad
            if g2 is not None and self.sparse_grad:
                keep = masks.get(p)
                if keep is not None:
                    sh.local(g2).mul_(keep)  # M * g'': the compressed point's gradient, on the kept weights only
            if self.plus:
                g = first.get(p)
                if g2 is None:
                    p.grad = g  # M * 0 + g
                elif g is not None:
                    g2.add_(g)
            p.copy_(w)
        del first, masks, backup
        self._base_step(scaling)
        return loss

    def _extra_state(self) -> dict:
        return {
            "generator": self._generator.get_state(),
            "last_sparsity": self.last_sparsity,
            "sparsities": list(self.sparsities),
            "plus": self.plus,
            "normalize": self.normalize,
            "sparse_grad": self.sparse_grad,
        }

    def _load_extra_state(self, extra: dict) -> None:
        # sparsities/plus/normalize/sparse_grad are saved for inspection; the constructor's values stay in charge
        self._generator.set_state(extra["generator"].detach().to(device="cpu", dtype=torch.uint8).contiguous())
        self.last_sparsity = extra.get("last_sparsity")


class S2SAM(_Wrapper):
    """Single-step SAM (NeurIPS 2024): one forward+backward per step.

    The perturbation reuses the previous step's gradient,
    e_t = rho * g_{t-1} / ||g_{t-1}|| (zero at the very first step); the
    gradient g_t at w + e_t is applied at w and kept for step t + 1 (it is
    part of the state dict, so a resumed run is bitwise the same).

    Unlike SAM and CrAM the caller runs NO pass before ``step``: the closure
    is the step's only forward+backward (``caller_runs_first_pass = False``),
    and the loss it returns is measured at w + e_t. Do not freeze BN in it:
    it is the only pass that can update the running statistics.
    """

    caller_runs_first_pass = False

    def __init__(self, params, base_optimizer_cls, rho: float = 0.05, **base_kwargs):
        super().__init__(params, base_optimizer_cls, dict(rho=rho), base_kwargs)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, scaler=None):
        closure = self._check_closure(closure)
        device = self._device()
        scaling = _Scaling.create(scaler, device)
        previous = {p: self.state[p]["prev_grad"] for p in self._params() if "prev_grad" in self.state[p]}
        backup = {p: p.detach().clone() for p in previous}
        if previous:
            norm = _global_norm(list(previous.values()), device)
            for group in self.param_groups:
                scale = group["rho"] / (norm + _EPS)
                for p in group["params"]:
                    if p in previous:
                        w = sh.local(p)
                        w.add_(sh.local(previous[p]) * scale.to(device=w.device, dtype=w.dtype))

        self.zero_grad(set_to_none=True)  # the step owns its one pass: stale grads must not leak in
        with torch.enable_grad():
            loss = closure()
        if scaling is not None:
            scaling.unscale_(self._params())

        for p in self._params():
            state = self.state[p]
            if p.grad is None:
                state.pop("prev_grad", None)  # no gradient this step: no perturbation from it next step
            elif "prev_grad" not in state:
                g = p.grad.detach().clone()
                state["prev_grad"] = g if scaling is None else torch.where(scaling.finite, g, torch.zeros_like(g))
            elif scaling is None:
                state["prev_grad"].copy_(p.grad)
            else:
                # a skipped (non-finite) step must not poison every later perturbation
                state["prev_grad"].copy_(torch.where(scaling.finite, p.grad, state["prev_grad"]))
        for p, w in backup.items():
            p.copy_(w)
        self._base_step(scaling)
        return loss
