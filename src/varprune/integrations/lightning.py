"""VAR in Lightning: ``Trainer(callbacks=[VarCallback(strength=1.0)])``.

Where it sits (Lightning 2.6, read from the installed source). Each optimizer
step runs ``Precision.optimizer_step``: the closure (forward, backward,
``on_after_backward``; with ``accumulate_grad_batches=k`` the loss is divided
by k and the step comes after the k-th batch), then

1. with AMP fp16 (``MixedPrecision`` with a GradScaler): ``scaler.unscale_``,
   except for optimizers that unscale inside their own ``step`` (fused Adam);
2. ``_after_closure``: the callbacks' ``on_before_optimizer_step``
   (**this callback adds VAR's gradient here**), the LightningModule's, then
   gradient clipping (``gradient_clip_val``);
3. the optimizer step (fp16: ``scaler.step``, skipped on overflow, and
   ``scaler.update``).

Hence VAR's gradient is clipped together with the loss's (as in a plain loop
that clips ``loss + reg()``), it is added once per optimizer step with the
full lambda onto the averaged accumulated gradient (the update of
``mean loss + lam * psi``), and with fp16 it is added unscaled, or times the
current scale where the optimizer unscales in ``step`` (the scaler's state
says which). bf16 and 32-bit need nothing. DDP: every process adds the same
gradient after the all-reduce. FSDP2 (``ModelParallelStrategy`` with
``fully_shard`` in ``configure_model``, or any strategy whose parameters are
DTensor shards): each process adds the gradient of its shards, computed from
every process's per-layer partial sums (numerics/shards.py: one collective per
step, exact). Refused: DeepSpeed and XLA FSDP by name (they partition outside
DTensor; DeepSpeed also owns the step) and FSDP1's flat parameters
(``FSDPStrategy`` in Lightning 2.6), whose shards cut layers across their
boundaries. Several optimizers are refused: each step would add the whole
model's VAR gradient.

Lambda is resolved in ``on_train_start``, after a checkpoint (weights and
this callback's state) is restored, on the weights of that moment; it is
saved in checkpoints (``state_dict``, with the callback's arguments), and a
resumed run with the same arguments keeps it. A second VarCallback in one
Trainer is refused: VAR would be applied twice. The VAR
term ``lam * psi`` is logged as ``var_term`` after each optimizer step
(``pl_module.log``: a device tensor, no host read).
"""

from __future__ import annotations

import warnings
from typing import Any

from varprune.integrations import VarCallbackBase, grad_scale, refuse_sharded

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError("varprune.integrations.lightning needs Lightning: pip install 'varprune[lightning]'") from e

# refused by name: they own the step or shard outside torch's DTensor; FSDPStrategy and ModelParallelStrategy are
# judged by their parameters when training starts (FSDP2's DTensors: fine; FSDP1's flat parameters: refused)
_SHARDED = ("DeepSpeedStrategy", "XLAFSDPStrategy")


class VarCallback(VarCallbackBase, pl.Callback):
    """Add VAR's closed-form gradient before each optimizer step of a Lightning ``Trainer``.

    ``VarCallback(strength=1.0)``: lambda = strength / psi(w) on the
    LightningModule's prunable weights when training starts; or
    ``VarCallback(lam=1e-6)``. Exactly one of the two. ``r``, ``eps``, ``exclude``
    as in [`VarRegularizer`][varprune.numerics.regularizers.VarRegularizer] and ``prunable_weights``, checked
    when the callback is made (a ValueError naming the argument at fault). After the
    start, ``callback.reg`` is the regularizer and ``callback.last_value`` the
    last step's ``lam * psi``. See the module docstring for its place relative
    to AMP unscaling, clipping and accumulation, and for what is refused.
    """

    def __init__(
        self,
        strength: float | None = None,
        lam: float | None = None,
        r: float = 1e-8,
        eps: float = 1e-8,
        exclude=(),
        *,
        log_term: bool = True,
    ):
        super().__init__(strength, lam, r, eps, exclude)
        if not isinstance(log_term, bool):
            raise ValueError(f"VarCallback: log_term must be True or False, got {log_term!r}")
        self.log_term = log_term
        self._restored_lam: float | None = None
        self._stepped = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if sum(isinstance(cb, VarCallbackBase) for cb in getattr(trainer, "callbacks", ())) > 1:
            raise ValueError(
                "VarCallback: this Trainer has more than one VarCallback, and each would add VAR's gradient "
                "(VAR twice); pass one (its exclude= chooses the weights)"
            )
        kind = type(trainer.strategy).__name__
        if kind in _SHARDED:
            raise ValueError(
                f"VarCallback cannot run under {kind}: it partitions parameters and gradients outside torch's "
                f"DTensor (DeepSpeed also steps the optimizer itself); use ModelParallelStrategy with fully_shard "
                f"(FSDP2), DDP or one device"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"VarCallback supports one optimizer, not {len(trainer.optimizers)}: each step would add "
                f"the whole model's VAR gradient; add VarRegularizer(...)() to your loss instead"
            )
        refuse_sharded(pl_module, type(trainer.strategy).__name__)
        self._resolve(pl_module, self._restored_lam)
        self._restored_lam = None
        self.last_value = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        device = self.reg.weights[0].device if self.reg is not None else None
        self._step(grad_scale(scaler, optimizer, device))
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.log_term and self._stepped and self.last_value is not None:
            pl_module.log("var_term", self.last_value, on_step=True, on_epoch=False, prog_bar=False)
        self._stepped = False

    def state_dict(self) -> dict[str, Any]:
        return {"resolved_lam": self.resolved_lam, "strength": self.strength, "lam": self.lam, "args": self.args()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # keyed by the arguments (a checkpoint of varprune <= 0.3 has none: its lambda is taken as before)
        entry = {"args": state_dict.get("args", self.args()), "attributes": state_dict}
        self._restored_lam = self.own_saved_lam(entry)
        if self._restored_lam is None and state_dict.get("resolved_lam") is not None:
            warnings.warn(
                f"VarCallback: the checkpoint's lambda belongs to a VarCallback with other arguments "
                f"({state_dict.get('args')}); lambda is resolved anew, on the resumed weights",
                stacklevel=2,
            )


__all__ = ["VarCallback"]
