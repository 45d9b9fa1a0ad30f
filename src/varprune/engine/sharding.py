"""Sharded training under torchrun (``--fsdp``): FSDP2's ``fully_shard``, so that a model whose weights,
gradients and optimizer state do not fit on one device trains over several.

``torchrun --nproc-per-node N -m varprune train ... --fsdp``: every block of the model's block stack (a
transformer's layers; image models: every top-level child that holds parameters) is a ``fully_shard`` unit,
then the root. Each process keeps 1/N of every weight, its gradient and its optimizer state (DTensors
sharded on dim 0); a block's weights are gathered for its forward and backward only. On a GPU the gathered
weights are bf16 and the gradient reduction fp32 (``MixedPrecisionPolicy``); on the CPU (gloo) all is fp32.

What stays as in one process (distributed.py says it for DDP): the data (each process its share of the
global batch, loss weights), the step (FSDP averages the shares' gradients as DDP does), the regularizers
(numerics/shards.py: exact on the shards with one collective), SAM's perturbation (its norm over all shards),
CrAM's mask (selected over all shards).
Files: rank 0 writes the same model.safetensors and checkpoint.safetensors as one process, gathered from the
shards (``full_state``, a collective every process joins), so prune, export and evaluate read them
unchanged and ``--resume`` continues with any sharding (``distribute_state`` cuts the checkpoint again).

Refused up front (``problems``): ``--fsdp`` without torchrun, ``--sam-local``, fine-tuning, and
(``model_problem``) a model with no block structure; ``--grad-checkpoint`` on a model without activation
checkpointing. CrAM and CrAM+ run: their global top-k mask is selected over every process's shards
(``shards.keep_masks``, a distributed radix select).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from varprune.numerics import shards as sh


def problems(cfg, world: int) -> list[str]:
    """What ``--fsdp`` / ``--grad-checkpoint`` cannot do with this configuration (no model built)."""
    if not cfg.fsdp:
        return []
    if world <= 1:
        return [
            "--fsdp shards the model over the processes torchrun starts: run "
            "`torchrun --nproc-per-node N -m varprune train ... --fsdp` with N >= 2, or leave --fsdp out"
        ]
    found = []
    if cfg.sam_local:
        found.append("--sam-local perturbs with each process's gradient, which sharding does not keep; drop one")
    if cfg.finetune_from is not None:
        found.append("--fsdp does not fine-tune with a fixed mask yet; fine-tune without --fsdp (DDP)")
    return found


def units(model: nn.Module, text: bool) -> list[nn.Module] | None:
    """The modules to ``fully_shard`` before the root: the block stack of a text model, the top-level children
    holding parameters of an image model; None when there is none."""
    if text:
        from varprune.numerics.calibration import find_block_stack
        from varprune.numerics.weights import prunable_weights

        found = find_block_stack(model, [name for name, _ in prunable_weights(model)])
        return list(found[1]) if found is not None else None
    children = [c for c in model.children() if any(True for _ in c.parameters())]
    return children or None


def model_problem(cfg, model: nn.Module, text: bool) -> str | None:
    """The model against ``--fsdp`` and ``--grad-checkpoint`` (``model`` may be on the meta device)."""
    if cfg.fsdp and units(model, text) is None:
        what = "a stack of blocks (transformer layers)" if text else "top-level modules holding parameters"
        return f"--fsdp: --model {cfg.model} has no {what} to shard one by one; train it without --fsdp"
    if cfg.grad_checkpoint and not getattr(model, "supports_gradient_checkpointing", False):
        return (
            f"--grad-checkpoint: --model {cfg.model} has no activation checkpointing (transformers models do: "
            f"gpt2, llama, bert, hf:DIR); leave it out"
        )
    return None


def shard(model: nn.Module, device: torch.device, text: bool) -> nn.Module:
    """``model`` sharded in place over the torchrun job (every process must hold the same weights first)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    found = units(model, text)
    assert found is not None, "model_problem refuses a model without units"
    for unit in found:
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Activation checkpointing of a transformers model (blocks recomputed in the backward pass)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]


def _map(value, fn):
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    return fn(value) if isinstance(value, torch.Tensor) else value


def full_state(state):
    """``state`` (a state dict, nested) with every DTensor gathered whole onto the CPU. A collective: every
    process calls it, in the same order; tensors that are not DTensors are left as they are."""
    return _map(state, lambda t: t.full_tensor().cpu() if sh.is_dtensor(t) else t)


def full_model_state(model: nn.Module) -> dict:
    """``model.state_dict()`` gathered whole (:func:`full_state`), a tied weight (one parameter under two names:
    GPT-2's ``lm_head.weight`` and token embedding) gathered once and kept one tensor, as in one process, so that
    the files store it once. The ties come from the model's structure, the same on every process."""
    first: dict[int, str] = {}
    owner = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner[name] = first.setdefault(id(p), name)
    own = model.state_dict()
    out = {k: full_state(v) for k, v in own.items() if owner.get(k, k) == k or owner[k] not in own}
    return {k: out[k] if k in out else out[owner[k]] for k in own}


def distribute_state(state, model: nn.Module):
    """A whole (gathered) model or optimizer state cut into this process's shards like ``model``'s weights:
    every floating tensor of one dimension or more becomes a DTensor sharded on dim 0 (no communication:
    every process holds the same whole state)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = next(p for p in model.parameters() if sh.is_dtensor(p)).device_mesh  # type: ignore[attr-defined]
    device = mesh.device_type

    def cut(t: torch.Tensor):
        if not t.is_floating_point() or t.dim() == 0:
            return t
        return distribute_tensor(t.to(device), mesh, [Shard(0)], src_data_rank=None)

    return _map(state, cut)


def distribute_model_state(state: dict, model: nn.Module) -> dict:
    """The whole model state cut like ``model``'s entries (parameters are DTensors, buffers stay whole)."""
    from torch.distributed.tensor import distribute_tensor

    own = model.state_dict()
    out = {}
    for k, v in state.items():
        mine = own.get(k)
        if isinstance(v, torch.Tensor) and mine is not None and sh.is_dtensor(mine):
            out[k] = distribute_tensor(
                v.to(mine.device_mesh.device_type), mine.device_mesh, mine.placements, src_data_rank=None
            )
        else:
            out[k] = v
    return out


@contextlib.contextmanager
def gathered_for_evaluation(model: nn.Module):
    """Every unit's weights gathered once and kept until the end: the processes' evaluation shares may take
    different numbers of batches, and a sharded forward is a collective every process must join."""
    from torch.distributed.fsdp import FSDPModule

    units_ = [m for m in model.modules() if isinstance(m, FSDPModule)]
    modules = [m for m in units_ if m is not model]  # the root: FSDP2 never reshards it after a forward anyway
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
    handles = [m.unshard(async_op=True) for m in units_]
    for h in handles:
        if h is not None:
            h.wait()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
