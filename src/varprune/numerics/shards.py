"""Sharded weights (FSDP2's DTensor parameters): what the regularizers need to stay exact on them, once.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a DTensor
sharded on dim 0 over a one-dimensional device mesh; uneven shards are padded
inside FSDP, and ``p.to_local()`` is this process's rows without the padding
(possibly none: a 1-row layer over two processes leaves one of them empty).
Each regularizer statistic of a layer is a sum over its elements, so every
process computes its shard's partial statistics for all layers, ONE collective
(:func:`gather_rows`, an all-gather of a few scalars per layer) gives every
process every shard's partials, and each process then combines them in the
same order in float64 (the same numbers everywhere, independent of the
collective's summation order) and writes the gradient of its own shard.

Refused, with the reason and FSDP2 as the way: FSDP1 (``FlatParameter``:
layers flattened and cut across layer boundaries), DeepSpeed ZeRO (the
engine partitions parameters outside the module), meshes of more than one
dimension, placements other than ``Shard``, and a weight list mixing shards
with whole tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

FSDP2_HINT = "shard with FSDP2 (torch.distributed.fsdp.fully_shard; varprune train --fsdp) instead"


class ShardingError(ValueError):
    """Weights sharded in a way the regularizers cannot be exact on (one line, names the way that works)."""


@dataclass(frozen=True)
class Shards:
    """The process group the weights are sharded over, and this process's place in it."""

    group: dist.ProcessGroup
    rank: int
    world: int


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (the tensor itself when it is not a DTensor); differentiable."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def refuse_unsupported(model: nn.Module, where: str = "VAR") -> None:
    """Raise :class:`ShardingError` for FSDP1 and DeepSpeed models (one line naming FSDP2)."""
    for m in model.modules():
        kind = type(m).__name__
        if kind == "FullyShardedDataParallel":
            raise ShardingError(
                f"{where} cannot run under FSDP1 (FullyShardedDataParallel): it flattens layers into FlatParameters "
                f"cut across layer boundaries, so no process can see a layer's elements; {FSDP2_HINT}"
            )
        if kind.startswith("DeepSpeed"):
            raise ShardingError(
                f"{where} cannot run under DeepSpeed: ZeRO partitions parameters and gradients inside its engine "
                f"and steps inside backward; {FSDP2_HINT}"
            )
    for name, p in model.named_parameters():
        if type(p).__name__ == "FlatParameter" or hasattr(p, "ds_id"):
            raise ShardingError(f"{where}: parameter {name} is a FSDP1/DeepSpeed flat shard; {FSDP2_HINT}")


def shards_of(named: list[tuple[str, Any]]) -> Shards | None:
    """None when no weight is a DTensor; else the group every weight is sharded over (or ShardingError)."""
    flags = [is_dtensor(p) for _, p in named]
    if not any(flags):
        return None
    if not all(flags):
        name = next(n for (n, _), f in zip(named, flags) if not f)
        raise ShardingError(
            f"weight {name} is a whole tensor while others are DTensor shards; shard every module that holds "
            f"prunable weights (fully_shard the root too)"
        )
    mesh = named[0][1].device_mesh
    for name, p in named:
        if p.device_mesh != mesh:
            raise ShardingError(f"weight {name} is on another device mesh than {named[0][0]}; use one mesh")
        if p.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in p.placements):
            raise ShardingError(
                f"weight {name} has placements {p.placements} on a {p.device_mesh.ndim}-d mesh; the regularizers "
                f"support FSDP2 sharding on a one-dimensional mesh (Shard placements)"
            )
    group = mesh.get_group()
    return Shards(group, dist.get_rank(group), dist.get_world_size(group))


def group_of(tensors) -> Shards | None:
    """The group of the first DTensor among ``tensors`` (None when there is none); no checks."""
    for t in tensors:
        if is_dtensor(t):
            group = t.device_mesh.get_group()
            return Shards(group, dist.get_rank(group), dist.get_world_size(group))
    return None


def gather_rows(stats: torch.Tensor, shards: Shards) -> torch.Tensor:
    """Every process's ``stats`` stacked: ``(world, *stats.shape)``, one all-gather, no host sync on CUDA."""
    stats = stats.contiguous()
    # concatenated along dim 0 (the layout every backend accepts, gloo included), then split by process
    out = stats.new_empty((shards.world * stats.shape[0], *stats.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.14
    gather(out, stats, group=shards.group)
    return out.view(shards.world, *stats.shape)


class _GatherSame(torch.autograd.Function):
    """All-gather whose result feeds a value every process computes identically.

    Backward hands each process the gradient of that value with respect to
    its own rows only: every process differentiates the same function, so its
    own rows' gradient is the whole of what its shard receives (no reduction;
    torch.distributed.nn's all_gather would sum the copies, ``world`` times
    too much here)."""

    @staticmethod
    def forward(ctx, stats, shards):
        ctx.rank = shards.rank
        return gather_rows(stats, shards)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None


def gather_rows_autograd(stats: torch.Tensor, shards: Shards) -> torch.Tensor:
    """:func:`gather_rows` for the autograd penalties (see ``_GatherSame``)."""
    return _GatherSame.apply(stats, shards)


def combine_variance(gathered: torch.Tensor, rank: int):
    """Per-layer population variance from every shard's ``(n, s, m, M2)`` (Chan et al.'s pairwise update).

    ``gathered``: ``(world, layers, 4)`` with, per shard, its element count
    ``n``, the shift ``s`` its magnitudes were taken from (its largest), ``m``
    the mean of ``w~ - s`` and ``M2`` the sum of squared deviations from that
    mean. Returns ``(var, correction)``: ``var`` per layer, and for shard
    ``rank`` the per-layer amount to add to its ``w~ - s - m`` to get
    ``w~ - mean(w~)`` over the whole layer. All shards' means are taken
    relative to the layer's largest shift ``S`` (``s - S`` exact by Sterbenz's
    lemma for magnitudes within a factor 2), so a layer of equal magnitudes
    has an exactly zero variance and correction, as in one process. Works
    with autograd (the shifts are constants).
    """
    n, s, m, m2 = gathered.unbind(-1)
    has = n > 0
    top = torch.where(has, s, torch.full_like(s, -torch.inf)).amax(0).detach()
    a = torch.where(has, (s - top) + m, torch.zeros_like(m))  # each shard's mean of w~ - S
    total = n.sum(0)
    mean = (n * a).sum(0) / total
    dev = a - mean
    var = (m2.sum(0) + (n * dev * dev).sum(0)) / total
    return var, dev[rank]


def keep_masks(magnitudes: list[torch.Tensor], n_pruned: int, shards: Shards, dtype=torch.bool) -> list[torch.Tensor]:
    """Keep-masks of this process's shards pruning exactly the ``n_pruned`` smallest magnitudes of all processes'.

    ``magnitudes``: this process's shards (non-negative floats), in the order of the whole tensors. Ties go by
    position in one process's flat order (tensor after tensor; inside a tensor sharded on dim 0, process after
    process), the earlier pruned first, as ``pruning.keep_mask_topk`` settles them: the masks are the slices of
    one process's mask. A distributed radix select on the magnitudes' bit patterns: one all-reduce of a
    256-bin histogram per byte (4 for float32, 8 for float64), then one all-gather of each tensor's count of
    the cut value; a host read per byte (as the CPU path of ``keep_mask_topk``)."""
    from varprune.numerics.pruning import magnitude_bits

    sizes = [t.numel() for t in magnitudes]
    device = magnitudes[0].device
    dtype_of = torch.float64 if any(t.dtype == torch.float64 for t in magnitudes) else torch.float32
    flat = torch.cat([t.detach().reshape(-1).to(dtype_of) for t in magnitudes])
    bits = magnitude_bits(flat)
    bits = torch.where(bits == torch.iinfo(bits.dtype).min, torch.zeros_like(bits), bits)  # -0.0 is a zero
    total = torch.tensor([flat.numel()], dtype=torch.long, device=device)
    dist.all_reduce(total, group=shards.group)
    k = int(n_pruned)
    if k <= 0 or k >= int(total):
        return [torch.full(t.shape, k <= 0, dtype=dtype, device=device) for t in magnitudes]
    nbits = 8 * bits.element_size()
    kth, n_less = 0, 0
    for shift in range(nbits - 8, -1, -8):
        above = shift + 8
        chosen = bits if above >= nbits else bits[(bits >> above) == (kth >> above)]  # the prefix found so far
        hist = torch.bincount((chosen >> shift) & 255, minlength=256)
        dist.all_reduce(hist, group=shards.group)
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, k - n_less))  # first digit value whose cumulative count reaches k
        n_less += int(cum[b - 1]) if b else 0
        kth |= b << shift
    excess = k - n_less  # equal to the cut value, pruned: the first ones in one process's order
    pieces = bits.split(sizes)
    equal = torch.stack([(piece == kth).sum() for piece in pieces]) if pieces else torch.zeros(0, dtype=torch.long)
    every = gather_rows(equal.to(device, torch.long), shards)  # (world, tensors)
    order = every.t().reshape(-1)  # tensor after tensor, process after process
    before = (order.cumsum(0) - order).view(len(sizes), shards.world)[:, shards.rank]
    masks = []
    for piece, t, ahead in zip(pieces, magnitudes, before.tolist()):
        here = max(0, min(excess - ahead, piece.numel()))
        is_equal = piece == kth
        keep = (piece > kth) | (is_equal & (is_equal.cumsum(0) > here))
        masks.append(keep.view(t.shape).to(dtype))
    return masks


__all__ = [
    "FSDP2_HINT",
    "ShardingError",
    "Shards",
    "combine_variance",
    "gather_rows",
    "gather_rows_autograd",
    "group_of",
    "is_dtensor",
    "keep_masks",
    "local",
    "refuse_unsupported",
    "shards_of",
]
