"""VAR in the Hugging Face ``Trainer``: ``trainer = Trainer(..., callbacks=[VarCallback(strength=1.0)])``.

Where it sits (transformers 5.x, ``Trainer._inner_training_loop``; read from
the installed source). For each optimizer step the Trainer runs every
micro-batch's forward and ``accelerator.backward`` (the loss divided by the
accumulation steps, or normalised by the step's token count), then

1. ``_clip_grad_norm`` when ``max_grad_norm > 0``, else ``_get_grad_norm``
   (a clip at infinity); both go through ``accelerator.clip_grad_norm_``,
   which first unscales fp16 gradients (``scaler.unscale_``);
2. ``on_pre_optimizer_step``: **this callback adds VAR's gradient here**;
3. ``optimizer.step()`` (with fp16: ``scaler.step``, which skips the step if
   the scaled gradients overflowed, then ``scaler.update``).

Hence:

* gradient accumulation: VAR's gradient is added once per optimizer step,
  with the full lambda, onto the accumulated (averaged) loss gradient: the
  update of ``mean loss + lam * psi``, exactly what a plain loop adding
  ``reg()`` to the loss of the whole batch gets;
* clipping: VAR's gradient is added after clipping, so it is not clipped
  (a plain loop that clips ``loss + reg()`` clips both); with
  ``max_grad_norm=0`` the two agree;
* fp16 (GradScaler): the gradients are already unscaled at this point; the
  callback checks the scaler's per-optimizer state anyway and, if they were
  still scaled, adds VAR's gradient times the current scale so that
  ``scaler.step`` unscales both alike. An overflowing step is skipped as a
  whole, VAR's part too. bf16 has no scaler: nothing to do;
* DDP: every process adds the same VAR gradient (same weights) after the
  all-reduce: right. DataParallel: the model the callback sees holds the
  reduced gradients: right;
* DeepSpeed: refused. Accelerate steps DeepSpeed's engine inside
  ``accelerator.backward`` and ZeRO partitions gradients, so no full gradient
  exists before the step for this hook to add to;
* FSDP2 (``fsdp_config={"version": 2}``, accelerate's ``fsdp_version: 2``):
  supported. The weights are DTensor shards; the regularizer computes each
  layer's variance from every process's partial sums (one collective per
  step for all layers) and adds the gradient of this process's shard, after
  the gradients' reduce-scatter: exactly what one process adds
  (numerics/shards.py). FSDP1 is refused: its flat parameters cut layers
  across their boundaries.

Lambda is resolved in ``on_train_begin`` (after a checkpoint's weights are
loaded), on the weights of that moment: ``lam = strength / psi(w)``. It is
saved with checkpoints (``trainer_state.json``, ``stateful_callbacks``, with
the callback's arguments), and a resumed run takes the lambda saved by a
VarCallback of the same arguments instead of resolving again on trained
weights. A second VarCallback in one Trainer is refused: VAR would be applied
twice. The VAR term ``lam * psi`` of the last step goes into the Trainer's
``log_history`` (key ``var_term``) at each logging step (one host read there).
"""

from __future__ import annotations

import os
import warnings

from varprune.integrations import VarCallbackBase, grad_scale, refuse_sharded

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("varprune.integrations.hf needs Hugging Face transformers: pip install 'varprune[hf]'") from e


def _fsdp_version(args) -> int | None:
    """The FSDP version the Trainer will shard with (None: no FSDP): TrainingArguments' ``fsdp`` and
    ``fsdp_config["version"]`` (2 by default in transformers 5), or accelerate's environment."""
    env = os.environ
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None)
        if not isinstance(config, dict):
            return 2
        return int(config.get("version") or config.get("fsdp_version") or 2)
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return int(env.get("FSDP_VERSION", "1"))
    return None


def _refuse(args, model) -> None:
    env = os.environ
    if getattr(args, "deepspeed", None) or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ValueError(
            "VarCallback cannot run under DeepSpeed: the engine steps the optimizer inside backward and ZeRO "
            "partitions the gradients, so there is no gradient to add VAR's to before the step; "
            "shard with FSDP2 instead (fsdp_config version 2)"
        )
    version = _fsdp_version(args)
    if version is not None and version != 2:
        raise ValueError(
            f"VarCallback cannot run under FSDP{version}: it flattens layers into FlatParameters cut across layer "
            f"boundaries; shard with FSDP2 instead (fsdp_config {{'version': 2}}, accelerate's fsdp_version: 2)"
        )
    refuse_sharded(model, "this sharding")


def _claim(state) -> None:
    """Refuse a second VarCallback in one Trainer: each would add VAR's gradient, applying it twice.

    Each hook below runs once per callback in the Trainer's list, on one TrainerState (made afresh by
    ``Trainer(...)`` and by every ``train()``): a second call on the same state is a second VarCallback, or
    the same one listed twice. The mark is an attribute, not a dataclass field: trainer_state.json omits it."""
    if getattr(state, "_varprune_var_callback", False):
        raise ValueError(
            "VarCallback: this Trainer has more than one VarCallback, and each would add VAR's gradient "
            "(VAR twice); pass one (its exclude= chooses the weights)"
        )
    state._varprune_var_callback = True


class VarCallback(VarCallbackBase, TrainerCallback, ExportableState):
    """Add VAR's closed-form gradient before each optimizer step of a ``transformers.Trainer``.

    ``VarCallback(strength=1.0)``: lambda = strength / psi(w) at the start of
    training (``VarRegularizer.from_strength``); or ``VarCallback(lam=1e-6)``.
    Exactly one of the two. ``r``, ``eps``: VAR's smoothing constants
    (finite, > 0); ``exclude``: a list of weight names or patterns left out
    (as ``prunable_weights(model, exclude)``). The arguments are checked when
    the callback is made: a ValueError naming the one at fault. After training starts,
    ``callback.reg`` is the [`VarRegularizer`][varprune.numerics.regularizers.VarRegularizer] (``reg.lam``,
    ``reg.psi_init``) and ``callback.last_value`` the last step's ``lam * psi``.
    See the module docstring for where it sits relative to clipping,
    accumulation and fp16, and why DeepSpeed and FSDP1 are refused (FSDP2 works).
    """

    def state(self) -> dict:
        return {"args": self.args(), "attributes": {"resolved_lam": self.resolved_lam}}

    def on_init_end(self, args, state, control, **kwargs):
        _claim(state)  # at Trainer(...): the earliest a second VarCallback is seen

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("VarCallback: the Trainer passed no model to on_train_begin")
        _refuse(args, model)
        _claim(state)  # again: add_callback() can add one after Trainer(...)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step > 0 else None
        lam = self.own_saved_lam(saved) if saved else None
        if saved and lam is None:
            warnings.warn(
                "VarCallback: the checkpoint holds no lambda of a VarCallback with these arguments "
                f"({self.args()}); lambda is resolved anew, on the resumed weights",
                stacklevel=2,
            )
        self._resolve(model, lam)
        self.last_value = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        inner = optimizer
        while hasattr(inner, "optimizer") and hasattr(inner, "scaler"):  # accelerate's AcceleratedOptimizer
            inner = inner.optimizer
        device = self.reg.weights[0].device if self.reg is not None else None
        self._step(grad_scale(getattr(optimizer, "scaler", None), inner, device))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.last_value is None or not state.log_history:
            return
        value = float(self.last_value)
        state.log_history[-1]["var_term"] = value
        if logs is not None:
            logs["var_term"] = value


__all__ = ["VarCallback"]
