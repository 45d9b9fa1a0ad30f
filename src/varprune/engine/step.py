"""One optimisation step for every method and task, and the learning-rate schedule.

The step never synchronises with the host: the first pass's loss, the task's training metric and a finite
flag accumulate in device tensors that the loop reads once per epoch.
"""

from __future__ import annotations

import contextlib
import math

import torch

from varprune.device import autocast
from varprune.numerics.optim import frozen_bn_stats
from varprune.tasks import Task


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_train_step(
    forward,
    model,
    optimizer,
    regularizers,
    task: Task,
    device: torch.device,
    amp: str,
    reg_in_every_pass: bool = False,
    after_step=None,
    first_pass_local=None,
    grad_clip: float = 0.0,
):
    """One optimisation step for any method: ``step(x, y, stats=None, weight=1.0)``.

    ``forward`` is the (possibly compiled) model. Regularizer gradients are
    closed-form (``apply_gradient_``) and added at the current weights w:

    * plain optimizers: after the backward pass;
    * two-pass methods (SAM, CrAM) and S2-SAM: once, to the final gradient,
      after the wrapper has restored w (``optimizer.final_gradient_hooks``),
      so lambda means the same as in a ``var`` run and the perturbation is
      taken from the loss alone;
    * ``reg_in_every_pass``: after every backward pass instead (at the
      perturbed point too), the composition of varprune 0.1.

    ``stats`` (device tensors) accumulate the first pass's loss, the task's
    training metric and a finite flag without synchronising with the host.
    ``after_step()`` runs after every optimizer step (masked fine-tuning puts
    pruned weights and their optimizer state back to zero there).

    Data parallel: ``forward`` is the DDP module, whose every backward
    all-reduces the gradient (both passes of SAM/CrAM: the perturbation uses
    the global gradient). ``weight`` scales the loss that is differentiated
    (``DeviceLoader.loss_weight``: uneven shares of the global batch).
    ``first_pass_local`` (``--sam-local``: DDP's ``no_sync``) keeps the first
    pass's gradient local, the SAM paper's per-process perturbation.
    Regularizer gradients are added after the reduction on every process
    alike: they depend on the weights only, which are the same everywhere.

    ``grad_clip`` > 0 scales the final gradient to that global norm at most,
    just before the (base) optimizer step: after the regularizers' gradients
    are added, so VAR's gradient is clipped with the loss's (as in Lightning;
    transformers' Trainer clips before its callbacks add anything).
    """
    two_pass = getattr(optimizer, "caller_runs_first_pass", None)
    hooked = two_pass is not None and regularizers and not reg_in_every_pass
    zero = torch.zeros((), device=device)
    current = {"stats": None}

    def add_regularizers(stats):
        value = sum((r.apply_gradient_() for r in regularizers), zero)
        if stats is not None:
            stats["reg"] += value * stats["_n"]
            stats["ok"] &= torch.isfinite(value)
        return value

    params = [p for p in model.parameters() if p.requires_grad]

    def clip():
        torch.nn.utils.clip_grad_norm_(params, grad_clip)

    if two_pass is not None:  # the wrapper restores w, then these run on the final gradient
        optimizer.final_gradient_hooks = [lambda: add_regularizers(current["stats"])] if hooked else []
        if grad_clip > 0:
            optimizer.final_gradient_hooks.append(clip)

    def forward_backward(x, y, stats, first=True, weight=1.0):
        with autocast(device, amp):
            output = task.forward(forward, x)
            loss = task.loss(output, y)
        (loss if weight == 1.0 else loss * weight).backward()
        if stats is not None:  # first pass only: what the epoch line reports
            n = len(y)
            stats["_n"] = n
            stats["loss"] += loss.detach().float() * n
            hits, count = task.train_hits(output, y)
            stats["hits"] += hits
            stats["count"] += count
            stats["ok"] &= torch.isfinite(loss.detach())
        if not hooked and (first or reg_in_every_pass):
            add_regularizers(stats)
        if stats is not None:
            stats["good_steps"] += stats["ok"].long()
        return loss

    def second_pass(x, y, weight):
        with frozen_bn_stats(model):  # BN statistics are updated by the first pass only
            return forward_backward(x, y, None, first=False, weight=weight)

    def step(x, y, stats=None, weight=1.0):
        current["stats"] = stats
        optimizer.zero_grad(set_to_none=True)
        if two_pass is None:  # plain optimizer
            forward_backward(x, y, stats, weight=weight)
            if grad_clip > 0:
                clip()
            optimizer.step()
        elif two_pass:  # SAM, CrAM: caller's pass, then the perturbed pass
            # --sam-local: the first backward without DDP's all-reduce (the optimizer then zeroes .grad,
            # so the second, synchronised backward reduces the perturbed gradient alone)
            with first_pass_local() if first_pass_local is not None else contextlib.nullcontext():
                forward_backward(x, y, stats, weight=weight)
            optimizer.step(lambda: second_pass(x, y, weight))
        else:  # S2-SAM: its one pass happens inside step
            optimizer.step(lambda: forward_backward(x, y, stats, weight=weight))
        if after_step is not None:
            after_step()

    return step
