"""One training loop for every method and every task.

``train(cfg, out)`` trains one run into a run folder (see rundir.py): config.json,
metrics.jsonl, checkpoint.safetensors after every epoch, model.safetensors at
the end. Every file is written atomically, checkpoint first: a run killed at
any moment resumes from its last complete epoch and, on the CPU, ends bitwise
identical to an uninterrupted run. metrics.jsonl is rewritten from the
checkpoint's history, so it never runs ahead of or behind it.

The hot loop never synchronises with the host: loss sums, metric counts and
the non-finite check accumulate in device tensors and are read once per epoch.

Under torchrun the same loop runs data-parallel (DDP; distributed.py says how
one step stays the step of one process with the global batch). The changes
here are few and marked: rank 0 alone writes the run folder, every process
gets the checkpoint from rank 0, and the end-of-epoch decisions (non-finite,
metrics) are reduced over the processes first, so they stop or go on together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, distributed
from .checkpoint import CheckpointError, atomic_write_text, load_checkpoint, load_model_state, save_checkpoint, \
    save_weights
from .config import LOCATION_KEYS, TrainConfig, problems
from .data import DeviceLoader, ImageData, load_dataset, locate_dataset, subset, validation_indices
from .device import autocast, describe_device, resolve_amp
from .errors import NonFiniteError, RunError, short
from .methods import build_optimizer, build_regularizers, get_method
from .models import create_model
from .regularizers import VarRegularizer
from .rundir import CHECKPOINT, CONFIG, METRICS, WEIGHTS, RunFolder
from .tasks import Task, task_for


# ---------------------------------------------------------------- what a run is made of

@dataclass
class RunData:
    data: ImageData
    task: Task
    train_loader: DeviceLoader
    test_loader: DeviceLoader


def data_problems(cfg: TrainConfig) -> list[str]:
    """A missing dataset, found by looking for its files (nothing is read)."""
    from .data import DATASETS
    if cfg.download or not isinstance(cfg.dataset, str) or cfg.dataset not in DATASETS:
        return []
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
        return []
    where = locate_dataset(cfg.dataset, cfg.data_dir, need_test=cfg.validation_fraction is None)
    return [] if where.complete else [where.not_found_message()]


def load_data(cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1) -> RunData:
    """The run's data on ``device``: the task, a shuffling, augmenting training loader, a test loader.

    Sets are held whole on the device as uint8; an image folder too large for
    that (half the device's free memory) streams through DataLoader workers.
    ``rank``/``world``: the loaders give this process its share (data parallel).
    """
    from .data import FOLDER_SETS
    if cfg.dataset in FOLDER_SETS:
        streamed = _streaming_data(cfg, device)
        if streamed is not None:
            if world > 1:
                raise RunError(f"{cfg.dataset} is too large for {device} and would be streamed from its files, "
                               f"which is not sharded across processes yet; train it in one process")
            return streamed
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.image_size,
                        need_test=cfg.validation_fraction is None)
    task = task_for(data.info)
    tx, ty, vx, vy = data.train_x, data.train_y, data.test_x, data.test_y
    if cfg.validation_fraction is not None:  # tuning: the "test" loader is a validation split of the training set
        keep, held = validation_indices(len(tx), cfg.validation_fraction)
        tx, ty, vx, vy = tx[keep], ty[keep], tx[held], ty[held]
    tx, ty = subset(tx, ty, cfg.limit_train, salt=0)
    vx, vy = subset(vx, vy, cfg.limit_test, salt=1)
    if len(tx) < 2 * world:
        raise RunError(f"{cfg.dataset} has {len(tx)} training example(s) here; BatchNorm needs at least 2"
                       + (f" per process ({world} processes)" if world > 1 else "")
                       + ": raise --limit-train or check the data folder")
    if len(vx) == 0:
        raise RunError(f"{cfg.dataset} has no test examples in {data.source}; the test split is needed to "
                       f"measure anything: check the data folder")
    train_loader = DeviceLoader(tx, ty, data.info, cfg.batch_size, train=True, device=device, seed=cfg.seed,
                                augment=task.augment if cfg.augment else None, channels_last=cfg.channels_last,
                                rank=rank, world=world)
    test_loader = DeviceLoader(vx, vy, data.info, max(cfg.batch_size, 500), train=False, device=device,
                               channels_last=cfg.channels_last, rank=rank, world=world)
    return RunData(data, task, train_loader, test_loader)


def _streaming_data(cfg: TrainConfig, device: torch.device) -> RunData | None:
    """RunData streaming from the files, or None when the decoded set fits on the device."""
    from .data import default_data_dir
    from .folderdata import (StreamingLoader, estimate_bytes, fits_on_device, scan_imagefolder, scan_tiny_imagenet,
                             streaming_info)
    root = cfg.data_dir or default_data_dir(cfg.dataset)
    listing = (scan_imagefolder if cfg.dataset == "imagefolder" else scan_tiny_imagenet)(root)
    size = cfg.image_size or (64 if cfg.dataset == "tiny-imagenet" else 32)
    if fits_on_device(estimate_bytes(listing.num_images, 3, size), device):
        return None
    info = streaming_info(listing, size)
    info = dataclasses.replace(info, class_names=tuple(listing.class_names))
    task = task_for(info)

    def pick(files, labels, limit, salt):
        idx = torch.arange(len(files))
        _, idx = subset(idx, idx, limit, salt)
        return [files[i] for i in idx.tolist()], [labels[i] for i in idx.tolist()]
    tf, tl, vf, vl = listing.train_files, listing.train_labels, listing.test_files, listing.test_labels
    if cfg.validation_fraction is not None:  # as in load_data: validation carved from the training files
        keep, held = (i.tolist() for i in validation_indices(len(tf), cfg.validation_fraction))
        tf, tl, vf, vl = [tf[i] for i in keep], [tl[i] for i in keep], [tf[i] for i in held], [tl[i] for i in held]
    tf, tl = pick(tf, tl, cfg.limit_train, 0)
    vf, vl = pick(vf, vl, cfg.limit_test, 1)
    train_loader = StreamingLoader(tf, tl, info, cfg.batch_size, train=True, device=device, seed=cfg.seed,
                                   augment=task.augment if cfg.augment else None, channels_last=cfg.channels_last)
    test_loader = StreamingLoader(vf, vl, info, max(cfg.batch_size, 500), train=False, device=device,
                                  channels_last=cfg.channels_last)
    empty = torch.zeros(0, dtype=torch.uint8)
    data = ImageData(info, empty, empty, empty, empty, f"{root} (streamed: too large for {device})")
    return RunData(data, task, train_loader, test_loader)


def build_model(cfg: TrainConfig, info, device: torch.device) -> torch.nn.Module:
    """The configured model for the data's shape (``--init`` weights loaded, if given)."""
    model = create_model(cfg.model, info.channels, info.num_classes, info.size, **cfg.model_args)
    if cfg.init:
        from .init_weights import load_initial_weights
        load_initial_weights(model, cfg.init, cfg.init_exclude or ())
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- the step

def make_train_step(forward, model, optimizer, regularizers, task: Task, device: torch.device, amp: str,
                    reg_in_every_pass: bool = False, after_step=None, first_pass_local=None):
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
    """
    from .optim import frozen_bn_stats
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

    if hooked:
        optimizer.final_gradient_hooks = [lambda: add_regularizers(current["stats"])]

    def forward_backward(x, y, stats, first=True, weight=1.0):
        with autocast(device, amp):
            output = forward(x)
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
        if two_pass is None:            # plain optimizer
            forward_backward(x, y, stats, weight=weight)
            optimizer.step()
        elif two_pass:                  # SAM, CrAM: caller's pass, then the perturbed pass
            # --sam-local: the first backward without DDP's all-reduce (the optimizer then zeroes .grad,
            # so the second, synchronised backward reduces the perturbed gradient alone)
            with first_pass_local() if first_pass_local is not None else contextlib.nullcontext():
                forward_backward(x, y, stats, weight=weight)
            optimizer.step(lambda: second_pass(x, y, weight))
        else:                           # S2-SAM: its one pass happens inside step
            optimizer.step(lambda: forward_backward(x, y, stats, weight=weight))
        if after_step is not None:
            after_step()

    return step


# ---------------------------------------------------------------- checkpoints

def _rng_state(device: torch.device, loader: DeviceLoader) -> dict:
    state = {"torch": torch.get_rng_state(), "loader": loader.generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device, loader: DeviceLoader) -> None:
    torch.set_rng_state(state["torch"])
    loader.generator.set_state(state["loader"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _plain(obj) -> bool:
    """Only JSON values (no tensors) in a nested structure."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(map(_plain, obj))
    return obj is None or isinstance(obj, (bool, int, float, str))


def check_checkpoint(state: dict, cfg: TrainConfig, path: Path) -> None:
    """Is ``state`` a complete training checkpoint of the run configured by ``cfg``?"""
    def bad(what):
        return CheckpointError(f"{path} is not a complete training checkpoint ({what}); "
                               f"retrain with `varprune train --overwrite`")
    for key, kind in (("epoch", int), ("config", dict), ("model", dict), ("optimizer", dict), ("rng", dict),
                      ("history", list)):
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise bad(f"no valid {key!r}")
    if not _plain(state["config"]):
        raise bad("its configuration holds tensors")
    rng = state["rng"]
    for key in ("torch", "loader"):
        if not isinstance(rng.get(key), torch.Tensor) or rng[key].dtype != torch.uint8:
            raise bad(f"no valid RNG state {key!r}")
    if not all(isinstance(h, dict) for h in state["history"]) or len(state["history"]) != state["epoch"]:
        raise bad("metrics history does not match its epoch")
    own = {k: v for k, v in cfg.to_dict().items() if k not in LOCATION_KEYS}
    defaults = TrainConfig().to_dict()   # a checkpoint of an older version lacks the fields added since
    theirs = {k: v for k, v in {**defaults, **state["config"]}.items() if k not in LOCATION_KEYS and k != "extra"}
    if own != theirs:
        diff = sorted(k for k in set(own) | set(theirs) if own.get(k, "?") != theirs.get(k, "?"))
        detail = ", ".join(f"{k} {short(theirs.get(k), 30)} vs {short(own.get(k), 30)}" for k in diff[:3])
        raise CheckpointError(f"{path} belongs to another run ({detail} in config.json); "
                              f"was it copied from elsewhere? retrain with `varprune train --overwrite`")
    if not 0 < state["epoch"] <= cfg.epochs:
        raise bad(f"epoch {state['epoch']} of {cfg.epochs}")


def _restore(state: dict, path: Path, model, optimizer, device: torch.device, loader: DeviceLoader) -> None:
    load_model_state(model, state["model"], path)
    bad = CheckpointError(f"{path} holds optimizer state of another method or model; "
                          f"retrain with `varprune train --overwrite`")
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError):
        raise bad from None
    # torch accepts a momentum buffer of the wrong shape or dtype here and fails at the first step
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = optimizer.state.get(p, {})
            if not isinstance(entry, dict):
                raise bad
            for buf in entry.values():
                if isinstance(buf, torch.Tensor) and buf.dim() > 0 and (buf.shape != p.shape
                                                                       or buf.dtype != p.dtype):
                    raise bad
                if not isinstance(buf, (torch.Tensor, int, float)) and buf is not None:   # a string, a list
                    raise bad
    try:
        _set_rng_state(state["rng"], device, loader)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} holds an invalid RNG state ({type(e).__name__}); "
                              f"retrain with `varprune train --overwrite`") from None


def _write_metrics(out: Path, history: list[dict]) -> None:
    atomic_write_text(out / METRICS, "".join(json.dumps(h) + "\n" for h in history))


def _all_finite(tensors) -> bool:
    """One host sync for all tensors (floating ones; integer buffers are always finite)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class _Progress:
    """A tqdm bar on a terminal, nothing otherwise (the epoch line is printed anyway)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self):
        if self.bar is not None:
            self.bar.update()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _finetune_start(cfg: TrainConfig, model, log):
    """Load the source run's final weights, prune them one-shot (the sweep's masks), and keep the mask."""
    from .checkpoint import load_weights
    from .masking import MaskKeeper
    from .sweep import pattern_masks, weights_digest
    source = Path(cfg.finetune_from)
    load_weights(source / WEIGHTS, model)
    masks, skipped = pattern_masks(model, cfg.finetune_sparsity, cfg.finetune_pattern, cfg.finetune_scope)
    keeper = MaskKeeper(model, masks)
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    log(f"fine-tuning {source} pruned to {100 * pruned / total:.2f}% ({cfg.finetune_pattern}"
        + (f", {len(skipped)} tensors left dense" if skipped else "") + "); pruned weights stay zero")
    return keeper, weights_digest(source / WEIGHTS)


def weights_metadata(cfg: TrainConfig, info) -> dict[str, str]:
    return {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method, "task": info.task}


# ---------------------------------------------------------------- the loop

def train(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
          log=print, progress: bool = True) -> dict:
    """Train one run into ``out``; return the last epoch's metrics.

    ``resume=True`` continues ``out`` from its last complete epoch (its own
    config.json is authoritative). Raises :class:`RunError` for bad input and
    :class:`NonFiniteError` when the loss or weights stop being finite.
    """
    folder = RunFolder(out)
    found = problems(cfg) + data_problems(cfg) + distributed.problems(cfg)
    if not found:
        distributed.setup(cfg.device)   # joins the torchrun job, if any (nothing happens in one process)
    if distributed.is_main():           # rank 0 owns the run folder
        found += folder.resume_problems() if resume else folder.new_run_problems(overwrite)
    distributed.raise_together(found)   # every problem at once, before any work, on every process
    if not distributed.is_main():
        log, progress = (lambda *a, **k: None), False
    with distributed.held_by_main(folder.lock):
        return _train(cfg, folder, resume, log, progress)


def _train(cfg: TrainConfig, folder: RunFolder, resume: bool, log, progress: bool) -> dict:
    out = folder.path
    device = distributed.setup(cfg.device)   # cuda:LOCAL_RANK under torchrun
    main, world = distributed.is_main(), distributed.world_size()
    amp = resolve_amp(cfg.amp, device)
    method = get_method(cfg.method)
    state = None
    if resume:
        def read_checkpoint():
            folder.clean_temporaries()  # what a write interrupted by a crash left behind
            if (out / CHECKPOINT).exists():
                found = load_checkpoint(out / CHECKPOINT)
                check_checkpoint(found, cfg, out / CHECKPOINT)
                return found
            return None
        state = distributed.from_main(read_checkpoint)   # rank 0 reads; every process gets it

    # may fail: nothing of an old run has been touched yet
    run = load_data(cfg, device, distributed.rank(), world)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, run.data.info, device)
    keeper, source_digest = _finetune_start(cfg, model, log) if cfg.finetune_from else (None, None)
    optimizer = build_optimizer(method, model, cfg)
    if keeper is not None:
        keeper.apply_(optimizer)
    regularizers = build_regularizers(method, model, cfg)
    monitor = next((r for r in regularizers if isinstance(r, VarRegularizer)), None) or VarRegularizer(model, 0.0)
    train_loader, test_loader, task = run.train_loader, run.test_loader, run.task

    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    base_lr = cfg.lr
    history: list[dict] = []
    start_epoch = 0
    info = run.data.info
    resolved = {"train": cfg.to_dict(), "resolved": {
        "device": str(device), "device_name": describe_device(device), "amp": amp, "task": task.name,
        "metric": task.primary, "input_shape": [info.channels, info.size, info.size],
        "num_classes": info.num_classes, "class_names": list(info.class_names),
        "train_examples": train_loader.num_examples, "test_examples": test_loader.num_examples,
        "steps_per_epoch": steps_per_epoch, "data_source": run.data.source, "processes": world,
        "var_lambda": next((r.lam for r in regularizers if isinstance(r, VarRegularizer)), None),
        "var_strength": next((r.strength for r in regularizers if isinstance(r, VarRegularizer)), None),
        "psi_init": next((r.psi_init for r in regularizers if isinstance(r, VarRegularizer)), None),
        "torch": torch.__version__, "varprune": __version__, "command": " ".join(sys.argv)}}
    if state is not None:
        schedule = state.get("schedule")
        started = state.get("processes", 1)
        if isinstance(schedule, dict) and schedule.get("total_steps") != total_steps and started != world:
            raise CheckpointError(f"{out / CHECKPOINT} was written by {started} process(es) with "
                                  f"{short(schedule.get('total_steps'))} steps; with {world} the last, partial "
                                  f"batch of each epoch is dropped differently ({total_steps} steps): resume it "
                                  f"with {started} process(es)")
        if isinstance(schedule, dict) and schedule.get("total_steps") != total_steps:
            raise CheckpointError(f"{out / CHECKPOINT} was written for {short(schedule.get('total_steps'))} steps, "
                                  f"but the data now gives {total_steps}: has the dataset changed? point --data-dir "
                                  f"at the original data or retrain with `varprune train --overwrite`")
        if keeper is not None and state.get("finetune_source_sha256") != source_digest:
            raise CheckpointError(f"{cfg.finetune_from}/{WEIGHTS} changed since {out} started fine-tuning from it: "
                                  f"the mask cannot be rebuilt; start again with --overwrite")
        _restore(state, out / CHECKPOINT, model, optimizer, device, train_loader)
        history = state["history"]
        start_epoch = state["epoch"]
        if start_epoch >= cfg.epochs and distributed.from_main(lambda: (out / WEIGHTS).exists()):
            if main:
                _write_metrics(out, history)
            log(f"{out} has already finished all {cfg.epochs} epochs")
            return history[-1]
        log(f"resuming {out} after epoch {start_epoch}/{cfg.epochs}"
            + (f" with {world} processes (it ran with {started})" if started != world else ""))
    elif resume:
        log(f"{out} has no complete epoch yet: starting it from the beginning")

    # DDP (under torchrun) after the weights are final: its constructor broadcasts rank 0's to every process
    ddp = distributed.wrap(model, device, cfg.sync_bn)
    forward = torch.compile(ddp) if cfg.compile else ddp
    local_first_pass = ddp.no_sync if cfg.sam_local and ddp is not model else None
    extra_state = {"processes": world, **({"finetune_source_sha256": source_digest} if keeper else {})}
    replacing = main and not resume and bool(folder.existing())
    if replacing:
        folder.set_aside()      # kept in .replaced-run/ until the new run's first checkpoint
    try:
        if main:
            folder.clean_temporaries()
            folder.mark()
            if not resume or not (out / CONFIG).exists():  # a resumed run's config.json stays as it was
                atomic_write_text(out / CONFIG, json.dumps(resolved, indent=2) + "\n")
            _write_metrics(out, history)
        result = _epochs(cfg, folder, model, forward, optimizer, regularizers, monitor, task, train_loader,
                         test_loader, device, amp, history, start_epoch, steps_per_epoch, total_steps, warmup,
                         base_lr, log, progress, on_first_checkpoint=folder.commit if replacing else None,
                         keeper=keeper, extra_state=extra_state, first_pass_local=local_first_pass)
    except BaseException:
        if replacing and not (out / CHECKPOINT).exists():
            folder.restore()
            log(f"the new run failed before its first checkpoint: the previous run in {out} is restored")
        raise
    if main:
        save_weights(out / WEIGHTS, model, weights_metadata(cfg, info))
    return result


def _epochs(cfg, folder, model, forward, optimizer, regularizers, monitor, task, train_loader, test_loader,
            device, amp, history, start_epoch, steps_per_epoch, total_steps, warmup, base_lr, log, progress,
            on_first_checkpoint=None, keeper=None, extra_state=None, first_pass_local=None) -> dict:
    out = folder.path
    main, parallel = distributed.is_main(), distributed.active()
    train_step = make_train_step(forward, model, optimizer, regularizers, task, device, amp,
                                 reg_in_every_pass=cfg.reg_in_every_pass,
                                 after_step=(lambda: keeper.apply_(optimizer)) if keeper is not None else None,
                                 first_pass_local=first_pass_local)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        zero = lambda dtype=torch.float32: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
        stats = {"loss": zero(), "reg": zero(), "hits": zero(torch.long), "count": zero(torch.long),
                 "ok": torch.ones((), dtype=torch.bool, device=device), "good_steps": zero(torch.long), "_n": 0}
        bar = _Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        t0 = time.perf_counter()
        seen = 0
        for i, (x, y) in enumerate(train_loader):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = base_lr * lr_factor(step, total_steps, warmup)
            train_step(x, y, stats, train_loader.loss_weight(i) if parallel else 1.0)
            seen += len(y)
            bar.update()
        bar.close()
        kept = (f"kept the checkpoint of epoch {epoch} in {out}" if epoch > 0 else
                f"no epoch had completed, so {out} holds no checkpoint")
        # data parallel: sums over every process, and a non-finite loss on any process stops them all here
        seen = distributed.reduce_epoch_(stats, seen)
        if not bool(stats["ok"]):
            bad_step = int(stats["good_steps"]) + 1
            raise NonFiniteError(f"non-finite loss at epoch {epoch + 1}, step {bad_step} of {steps_per_epoch}; "
                                 f"{kept}; lower --lr or the regularizer strength")
        if not distributed.all_true(_all_finite(model.state_dict().values()), device):
            raise NonFiniteError(f"non-finite weights at epoch {epoch + 1}, step {steps_per_epoch} of "
                                 f"{steps_per_epoch}; {kept}; lower --lr or the regularizer strength")
        train_time = time.perf_counter() - t0
        if parallel:
            if not cfg.sync_bn:
                distributed.average_bn_buffers_(model)   # each process tracked the statistics of its share
            distributed.check_identical(model)
        variances = monitor.variances()
        # each process evaluates its share of the test set; the counts are summed
        test = task.evaluate(model, test_loader, amp, reduce=distributed.sum_ if parallel else None)
        metrics = {
            "epoch": epoch + 1,
            "loss": float(stats["loss"] + stats["reg"]) / seen,
            "task_loss": float(stats["loss"]) / seen,
            "var_term": float(stats["reg"]) / seen if regularizers else 0.0,
            task.train_key: float(stats["hits"]) / max(1, int(stats["count"])),
            **{f"test_{k}": v for k, v in test.items() if isinstance(v, float)},
            "mean_layer_variance": sum(variances.values()) / len(variances),
            "layer_variance": variances,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": train_time,
        }
        if task.name == "classification":
            metrics["cross_entropy"] = metrics.pop("task_loss")   # the key of varprune 0.1
        history.append(metrics)
        if not main:     # rank 0 alone writes the run folder
            continue
        # the checkpoint first, then the metrics: a crash between the two is repaired by --resume
        save_checkpoint(out / CHECKPOINT, {
            "epoch": epoch + 1, "config": cfg.to_dict(), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": _rng_state(device, train_loader), "history": history,
            "schedule": {"step": (epoch + 1) * steps_per_epoch, "total_steps": total_steps, "warmup": warmup},
            **(extra_state or {})})
        if on_first_checkpoint is not None:
            on_first_checkpoint()
            on_first_checkpoint = None
        _write_metrics(out, history)
        primary = metrics[f"test_{task.primary}"]
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {metrics['loss']:.4f}  "
            f"train {100 * metrics[task.train_key]:.2f}%  test {task.primary} {100 * primary:.2f}%  "
            f"var|w| {metrics['mean_layer_variance']:.3g}  {train_time:.1f}s")
    return history[-1] if history else {}
