"""Masked fine-tuning: keep pruned weights at exactly zero through any optimizer.

A `MaskKeeper` holds one keep-mask per pruned parameter (True = kept)
and enforces it three ways:

* a gradient hook on each masked parameter zeroes the pruned entries of every
  gradient autograd produces for it (``hooks=True``, the default), so a
  wrapper that runs its own backward passes inside ``step`` (SAM, CrAM,
  S2-SAM) only ever sees masked gradients and never perturbs a pruned weight;
* `MaskKeeper.mask_grads_` does the same to ``.grad`` explicitly (for
  ``hooks=False``, or gradients written by hand);
* `MaskKeeper.apply_` zeroes the pruned weights, and given the
  optimizer, the pruned entries of every state buffer shaped like the
  parameter (SGD ``momentum_buffer``, Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``, S2-SAM's ``prev_grad``), in the wrapper's own state and
  in its ``base_optimizer``'s.

Calling protocol::

    keeper = MaskKeeper(model, masks)       # masks from MagnitudePruner.apply / prune_magnitude
    keeper.apply_(optimizer)                # once: zero weights and any dense-training state
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        keeper.mask_grads_()                # a no-op with hooks; required with hooks=False
        optimizer.step()                    # or opt.step(closure) for SAM / CrAM / S2-SAM
        keeper.apply_(optimizer)            # after every step

Why both: with masked gradients a pruned weight already gets a zero update
from SGD (momentum and weight decay act on zeros) and from Adam/AdamW (zero
moments, decoupled decay of zero), but a momentum buffer carried over from
dense training, or a weight-decay term on a weight that is not exactly zero,
would move it. ``apply_`` after each step makes the invariant exact
whatever the optimizer does; masking the gradients keeps the optimizer's
state consistent with the sparse model.

Pruned weights are set with ``masked_fill_`` (+0.0, also where the weight was
inf or nan), never by multiplying with the mask.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["MaskKeeper"]


class MaskKeeper:
    """Keep the pruned entries of ``model``'s parameters at zero during training.

    ``masks`` maps parameter names (as in ``model.named_parameters()``) to
    boolean tensors of the parameter's shape, True = kept. The masks are
    copied to each parameter's device. ValueError for an unknown name, a
    wrong shape or a non-boolean mask. See the module docstring for the
    calling protocol. ``remove()`` detaches the gradient hooks.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], hooks: bool = True):
        params = dict(model.named_parameters())
        if not masks:
            raise ValueError("MaskKeeper needs at least one mask (prune the model first)")
        self._entries: list[tuple[str, nn.Parameter, torch.Tensor]] = []
        for name, mask in masks.items():
            if name not in params:
                raise ValueError(
                    f"mask {name!r} names no parameter of the model "
                    f"(e.g. {next(iter(params), '?')!r}); masks are keyed by parameter name"
                )
            p = params[name]
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask {name!r} must be a bool tensor (True = kept), "
                    f"got {getattr(mask, 'dtype', type(mask).__name__)}"
                )
            if mask.shape != p.shape:
                raise ValueError(f"mask {name!r} has shape {list(mask.shape)}, the parameter {list(p.shape)}")
            # the pruned positions, stored once: masked_fill_ wants True where zeros go
            self._entries.append((name, p, (~mask).to(p.device)))
        self._handles = []
        if hooks:
            for _, p, pruned in self._entries:
                self._handles.append(p.register_hook(self._hook(pruned)))

    @staticmethod
    def _hook(pruned: torch.Tensor):
        cache = {pruned.device: pruned}

        def hook(grad: torch.Tensor) -> torch.Tensor:
            where = cache.get(grad.device)
            if where is None:  # the model moved after the keeper was built
                where = cache[grad.device] = pruned.to(grad.device)
            return grad.masked_fill(where, 0)

        return hook

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self._entries]

    def _pruned_on(self, p: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
        return pruned if pruned.device == p.device else pruned.to(p.device)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the pruned entries of every masked parameter's ``.grad`` (if it has one)."""
        for _, p, pruned in self._entries:
            if p.grad is not None:
                p.grad.masked_fill_(self._pruned_on(p.grad, pruned), 0)

    @torch.no_grad()
    def apply_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned weights; with ``optimizer``, also the pruned entries of its state buffers.

        Every tensor in ``optimizer.state[p]`` with ``p``'s shape is masked, for
        the optimizer itself and, recursively, its ``base_optimizer`` (the SAM,
        CrAM and S2-SAM wrappers of varprune.optim keep momentum there).
        Scalars such as Adam's ``step`` are left alone.
        """
        for _, p, pruned in self._entries:
            p.masked_fill_(self._pruned_on(p, pruned), 0)
        if optimizer is None:
            return
        for state in _optimizer_states(optimizer):
            for _, p, pruned in self._entries:
                if p not in state:  # state is a defaultdict: do not create entries
                    continue
                for value in state[p].values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        value.masked_fill_(self._pruned_on(value, pruned), 0)

    def remove(self) -> None:
        """Detach the gradient hooks (``apply_``/``mask_grads_`` keep working)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _optimizer_states(optimizer) -> Iterator[dict]:
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            yield state
        optimizer = getattr(optimizer, "base_optimizer", None)
