"""Data-parallel training under torchrun (DistributedDataParallel), in a few plain functions.

``torchrun --nproc-per-node N -m varprune train ...`` starts N processes with
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; several nodes
use torchrun's own rendezvous (``--nnodes``, ``--rdzv-endpoint``). varprune
has no launcher of its own. Each process trains on ``cuda:LOCAL_RANK`` with
NCCL, or on the CPU with gloo, chosen from ``--device``.

One step under N processes computes what one process computes with the same
``--batch-size`` (the global batch):

* data: every process draws the same permutation and takes its contiguous
  share of each global batch (``data.DeviceLoader``); shares differ by at most
  one example, and each process's loss is weighted by ``n_rank * N / n_batch``
  so that DDP's average of per-process mean gradients is the mean over the
  global batch exactly (``DeviceLoader.loss_weight``). Exact for losses that
  are means over examples (cross-entropy); segmentation's soft-Dice term is
  pooled over each process's share instead of the global batch, as in any
  data-parallel U-Net training;
* gradients: DDP all-reduces each backward, the first pass of SAM/CrAM
  included, so perturbations use the global gradient (``--sam-local``: the
  SAM paper's per-process perturbation, first backward under ``no_sync()``);
* everything else is identical on every process, and so needs no
  communication: weights and optimizer state (same seed, same all-reduced
  gradient), the closed-form regularizer gradients (VAR, l1, Hoyer are
  functions of the weights alone), CrAM's seeded sparsity draw and its top-k
  mask, S2-SAM's previous (all-reduced) gradient. ``check_identical`` checks
  this once per epoch (one scalar collective);
* BatchNorm: ``--sync-bn`` normalises with the global batch's statistics
  (torch's SyncBatchNorm on GPUs, :class:`GlobalBatchNorm` on the CPU, where
  torch's refuses to run) and then matches one process; without it each
  process normalises its share and the running statistics are averaged over
  the processes at the end of every epoch, before evaluation and checkpoint.

Rank 0 alone touches the run folder; decisions that end a run (bad input,
non-finite loss) are reduced first so that every process takes them together.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from varprune.errors import CheckpointError, DatasetError, NonFiniteError, RunError

_state = {"rank": 0, "world": 1, "local": 0, "active": False, "single": False, "alone": False}


# ---------------------------------------------------------------- who am I


def launched() -> bool:
    """Started by torchrun with more than one process (and not told to run alone)."""
    return not _state["single"] and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def env_rank() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def active() -> bool:
    return bool(_state["active"])


def rank() -> int:
    return _state["rank"]


def world_size() -> int:
    return _state["world"]


def is_main() -> bool:
    return _state["rank"] == 0


def alone() -> None:
    """From here on this process (rank 0) works alone: the others have returned from the command and wait in
    :func:`shutdown`'s barrier (a study's sweeps, analysis and report), so every helper here acts as in one
    process. Without this a collective of rank 0's (a calibration's memory verdict, an evaluation's sum) would
    wait for partners that never come: the job hung."""
    if _state["active"]:
        _state.update(rank=0, world=1, active=False, single=True, alone=True)


def main_only() -> bool:
    """For commands that run in one process (prune, report, export...): rank 0 runs them alone, the
    other processes of a torchrun job return at once. True if this process should run the command."""
    if launched() and env_rank() != 0:
        return False
    _state["single"] = True  # rank 0 never waits for partners that have left
    return True


# ---------------------------------------------------------------- joining the job


def problems(cfg) -> list[str]:
    """What a configuration cannot do under this torchrun job (read from the environment; nothing starts)."""
    world = env_world()
    found = []
    if world > 1 and cfg.batch_size < 2 * world:
        found.append(
            f"--batch-size {cfg.batch_size} is the global batch, split across {world} processes; "
            f"BatchNorm needs 2 examples in each: give at least {2 * world}"
        )
    return found


def setup(device_name: str = "auto") -> torch.device:
    """This process's device; joins the torchrun job (once) when started by torchrun.

    NCCL on CUDA (one GPU per process: ``cuda:LOCAL_RANK``), gloo on the CPU.
    Without torchrun, or with one process, nothing is initialised.
    """
    from varprune.device import resolve_device

    device = resolve_device(device_name)
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device_name.startswith("cuda:") and env_world() > 1:
            raise RunError(
                f"--device {device_name} names one GPU, but torchrun started {env_world()} processes; "
                f"give --device cuda (process k uses cuda:LOCAL_RANK)"
            )
        if local >= torch.cuda.device_count():
            raise RunError(
                f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes on this "
                f"node, but it has {torch.cuda.device_count()} GPU(s): give --nproc-per-node "
                f"{torch.cuda.device_count()} or fewer"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not _state["active"]:
        if not dist.is_initialized():
            # a long timeout: rank 0 may evaluate or write a large checkpoint while the others wait
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
        _state.update(rank=dist.get_rank(), world=dist.get_world_size(), local=local, active=True)
    return device


def agreed(error: Exception) -> Exception:
    """Mark ``error`` as raised by every process at the same point, after a collective decided it (a non-finite
    loss on any process, a problem gathered from all, rank 0's verdict broadcast): they all reach `shutdown`."""
    error.varprune_agreed = True  # type: ignore[attr-defined]
    return error


def is_agreed(error: BaseException) -> bool:
    return bool(getattr(error, "varprune_agreed", False))


def shutdown(together: bool = False) -> None:
    """Leave the process group. ``together`` (the command succeeded on every process, or failed on every
    process by an `agreed` error): wait for the others first, so that no process tears its connections down
    while a peer still uses them (gloo then aborts the peer at exit: "terminate called without an active
    exception", seen under load on success and on an agreed non-finite loss). After a failure of one process
    alone there is no wait: the others may never come."""
    if (_state["active"] or _state["alone"]) and dist.is_initialized():
        if together:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()
    _state.update(rank=0, world=1, local=0, active=False, single=False, alone=False)


# ---------------------------------------------------------------- agreeing

_ERRORS = {c.__name__: c for c in (RunError, CheckpointError, DatasetError, NonFiniteError, ValueError)}


def raise_together(found: list[str]) -> None:
    """Raise RunError with every process's problems on every process (exit 2 everywhere, no hang)."""
    if active():
        gathered: list[list[str]] = [[] for _ in range(world_size())]
        dist.all_gather_object(gathered, list(found))
        found = list(dict.fromkeys(p for part in gathered for p in part))
    if found:
        error = RunError("; ".join(found))
        raise agreed(error) if active() else error


def from_main(fn):
    """``fn()`` run on rank 0 alone; its result (or its bad-input error) reaches every process.

    Used for everything read from the run folder (a checkpoint is broadcast, so
    the other nodes need no shared file system) and for rank 0's decisions.
    """
    if not active():
        return fn()
    box: list = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except tuple(_ERRORS.values()) as e:
            box[0] = ("error", type(e).__name__ if type(e).__name__ in _ERRORS else "ValueError", str(e))
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "error":
        raise agreed(_ERRORS[box[0][1]](box[0][2]))
    return box[0][1]


@contextlib.contextmanager
def held_by_main(make_context):
    """Enter ``make_context()`` (the run folder's lock) on rank 0 only; failing to is an error everywhere."""
    with contextlib.ExitStack() as stack:

        def enter() -> None:
            stack.enter_context(make_context())

        from_main(enter)
        yield


# ---------------------------------------------------------------- reductions (device tensors)


def sum_(t: torch.Tensor) -> torch.Tensor:
    """All-reduce ``t`` in place (sum over processes); returned for chaining."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_epoch_(stats: dict, seen: int) -> int:
    """The epoch's statistics over the global batch: sums, and 'ok' only if every process was finite.

    Two collectives per epoch. ``good_steps`` becomes the first step that went
    wrong on any process. Returns the number of examples seen by all processes.
    """
    if not active():
        return seen
    dev = stats["loss"].device
    sums = torch.stack(
        [
            stats["loss"].double(),
            stats["reg"].double(),
            stats["hits"].double(),
            stats["count"].double(),
            torch.tensor(float(seen), dtype=torch.float64, device=dev),
        ]
    )
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    # min over processes, as a max of negatives (gloo and NCCL both have MAX)
    flags = torch.stack([(~stats["ok"]).long(), -stats["good_steps"].long()])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stats["loss"], stats["reg"] = sums[0].float(), sums[1].float()
    stats["hits"], stats["count"] = sums[2].long(), sums[3].long()
    stats["ok"] = flags[0] == 0
    stats["good_steps"] = -flags[1]
    return int(sums[4])


def all_true(flag: bool, device: torch.device) -> bool:
    """``flag`` on every process (a host-side decision that every process must take alike)."""
    if not active():
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) == 0


def average_bn_buffers_(model: nn.Module) -> None:
    """Running BN statistics averaged over the processes (each tracked its own share of the batches)."""
    if not active():
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(world_size())


def check_identical(model: nn.Module) -> None:
    """Weights and buffers must be the same on every process; a difference is a bug, said loudly.

    The fingerprint is one float64 sum per tensor, weighted by position, compared
    by a max and a min over the processes (one collective).
    """
    if not active():
        return
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return
    dev = tensors[0].device
    fp = torch.stack([t.detach().double().sum() * (i + 1) for i, t in enumerate(tensors)]).sum().to(dev)
    both = torch.stack([fp, -fp])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not bool(torch.isfinite(both).all()):
        return  # non-finite weights are reported by the caller
    if float(both[0]) != -float(both[1]):
        raise RuntimeError(
            "the processes' weights differ: data-parallel training went out of step "
            "(a bug in varprune; please report it with the command line)"
        )


# ---------------------------------------------------------------- the model


class _SumOverProcesses(torch.autograd.Function):
    """y = the sum of x over the processes; the gradient of x is the sum of y's gradients (it feeds
    every process's loss), which is what makes GlobalBatchNorm's backward the one-process backward."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch, for the CPU (torch's SyncBatchNorm needs a GPU).

    In training the mean and the (biased) variance are taken over every
    process's share with two differentiable all-reduces
    (their backward all-reduces the gradient, as SyncBatchNorm's does), so the forward and the gradient are
    those of one process with the whole batch. Running statistics get the
    unbiased variance, as in ``nn.BatchNorm``. In evaluation, or outside a
    process group, it is ``nn.BatchNorm``. The state dict keys are BatchNorm's.
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        all_reduce = _SumOverProcesses.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        local = x.numel() // x.shape[1]
        packed = all_reduce(torch.cat([x.sum(dims), x.new_full((1,), float(local))]))
        n = packed[-1].detach()
        mean = packed[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            assert self.num_batches_tracked is not None and self.running_mean is not None
            assert self.running_var is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``model`` (in place) normalising over the global batch; parameters and buffers kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            for key in ("weight", "bias"):
                if getattr(child, key, None) is not None:
                    setattr(new, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                new._buffers[key] = child._buffers.get(key)
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_sync_bn(child, device)
    return model


def wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DDP around ``model`` under torchrun (``model`` itself otherwise).

    ``broadcast_buffers=False``: DDP would otherwise copy rank 0's buffers to
    every process at every forward, which makes the BN statistics those of
    rank 0's share alone and, with a second forward before the first
    backward's reduction has been used (SAM's pattern), is a classic source of
    in-place errors; varprune averages the running statistics once per epoch
    instead (or --sync-bn makes them global). DDP's constructor broadcasts
    rank 0's parameters and buffers once, so every process starts identical.
    """
    if not active():
        return model
    if sync_bn:
        model = convert_sync_bn(model, device)
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch >= 2.14 names it forward_sync_buffers (buffers are still synchronised once, at construction)
    no_sync: dict = {
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DDP).parameters
        else "broadcast_buffers": False
    }
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
