"""VAR in a trainer you already use: thin callbacks over ``varprune.VarRegularizer``.

* ``from varprune.integrations.hf import VarCallback``: Hugging Face ``Trainer``
  (``pip install 'varprune[hf]'``);
* ``from varprune.integrations.lightning import VarCallback``: Lightning
  (``pip install 'varprune[lightning]'``).

Both take ``strength=`` (lambda = strength / psi(w) on the weights at the
start of training, as ``VarRegularizer.from_strength``) or ``lam=``; both act
on the model's trainable prunable weights (frozen ones are left out), and add
VAR's closed-form gradient to ``.grad`` once per optimizer step, before the
step, in the units of the other gradients (a GradScaler's scale included when
the gradients are still scaled there). The added gradient is the one of
``loss + reg()`` with ``reg = VarRegularizer(model, lam)``: a loop that adds the
autograd penalty to its loss trains the same weights (the tests check it with
each trainer). Importing this package imports neither transformers nor
Lightning; each submodule imports its trainer and says how to install it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from varprune.numerics.regularizers import VarRegularizer
from varprune.numerics.weights import prunable_weights


class VarCallbackBase:
    """What both callbacks share: arguments, resolving lambda, the gradient at a step."""

    def __init__(
        self,
        strength: float | None = None,
        lam: float | None = None,
        r: float = 1e-8,
        eps: float = 1e-8,
        exclude=(),
    ):
        if (strength is None) == (lam is None):
            raise ValueError("VarCallback: give exactly one of strength= (lambda = strength / psi(w_start)) or lam=")
        value = strength if lam is None else lam
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
            which = "strength" if lam is None else "lam"
            raise ValueError(f"VarCallback: {which} must be a finite number >= 0, got {value!r}")
        self.strength = None if strength is None else float(strength)
        self.lam = None if lam is None else float(lam)
        try:
            self.r, self.eps = VarRegularizer.check_constants(r, eps)
        except ValueError as e:
            raise ValueError(f"VarCallback: {e}") from None
        try:
            names = None if isinstance(exclude, str) else list(exclude)
        except TypeError:
            names = None
        if names is None or not all(isinstance(x, str) for x in names):
            raise ValueError(
                f"VarCallback: exclude must be a list of weight names or patterns (exclude=['fc.*']), got {exclude!r}"
            )
        self.exclude: list[str] = names
        self.reg: VarRegularizer | None = None  # built when training starts
        self.resolved_lam: float | None = None  # the lambda in use (saved with checkpoints)
        self.last_value: torch.Tensor | None = None  # lam * psi at the last step (a device tensor)

    def args(self) -> dict:
        """The arguments that make this callback: the key its saved lambda is found by on resume."""
        return {"strength": self.strength, "lam": self.lam, "r": self.r, "eps": self.eps, "exclude": self.exclude}

    def own_saved_lam(self, saved) -> float | None:
        """The lambda a checkpoint saved for a callback made with this one's arguments (the newest such), or None.

        ``saved``: one saved state or a list of them, each ``{"args": ..., "attributes": {"resolved_lam": ...}}``.
        Keyed by the arguments, not by position: a Trainer's checkpoint can hold several states of one callback
        class (transformers appends each save's states to those of the start, when lambda was not yet known)."""
        for entry in reversed(saved if isinstance(saved, list) else [saved]):
            if not isinstance(entry, dict) or entry.get("args") != self.args():
                continue
            value = (entry.get("attributes") or {}).get("resolved_lam")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None

    def _resolve(self, model: nn.Module, saved_lam: float | None = None) -> VarRegularizer:
        """Build the regularizer on ``model``'s trainable prunable weights; ``saved_lam`` (a resumed run's) wins.

        Frozen weights (``requires_grad=False``: a frozen backbone, LoRA's base
        layers) are left out: no optimizer moves them, and VAR would give each
        of them a gradient buffer for nothing."""
        weights = [(n, p) for n, p in prunable_weights(model, self.exclude) if p.requires_grad]
        if not weights:
            raise ValueError("VarCallback: the model has no trainable prunable weights")
        if saved_lam is not None:
            reg = VarRegularizer(weights, float(saved_lam), r=self.r, eps=self.eps)
        elif self.lam is not None:
            reg = VarRegularizer(weights, self.lam, r=self.r, eps=self.eps)
        else:
            assert self.strength is not None  # __init__ takes exactly one of strength and lam
            reg = VarRegularizer.from_strength(weights, self.strength, r=self.r, eps=self.eps)
        self.reg, self.resolved_lam = reg, reg.lam
        return reg

    def _step(self, scale) -> None:
        if self.reg is None:
            raise RuntimeError("VarCallback: an optimizer step before training started (the hook that builds VAR)")
        self.last_value = self.reg.apply_gradient_(scale)


def refuse_sharded(model: nn.Module, where: str) -> None:
    """Refuse what VAR cannot be exact on: FSDP1's flat parameters (layers cut across their boundaries) and
    DeepSpeed's partitions, in one line naming FSDP2. FSDP2's DTensor shards are fine: the regularizer works on
    each process's shards with one collective (numerics/shards.py)."""
    from varprune.numerics.shards import ShardingError, refuse_unsupported

    try:
        refuse_unsupported(model, f"VarCallback (under {where})")
    except ShardingError as e:
        raise ValueError(str(e)) from None


def grad_scale(scaler, optimizer: torch.optim.Optimizer, device: torch.device | None):
    """The scale of ``optimizer``'s gradients: None when unscaled, else the GradScaler's scale (a 0-d tensor).

    A ``torch.amp.GradScaler`` records per optimizer whether ``unscale_`` ran
    since the last ``update``; while it has not, the gradients carry the loss
    scale, and so must VAR's (``scaler.step`` then unscales both together).
    ``device``: the weights' (None, before VAR is built: torch's default device).
    """
    if scaler is None or not scaler.is_enabled():
        return None
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None and id(optimizer) in states and states[id(optimizer)]["stage"] is OptState.UNSCALED:
        return None
    return scaler.scale(torch.ones((), device=device))


__all__ = ["VarCallbackBase", "grad_scale", "refuse_sharded"]
