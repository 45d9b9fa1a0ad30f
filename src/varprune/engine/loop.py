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
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from varprune import __version__
from varprune.device import describe_device, resolve_amp
from varprune.engine import distributed, sharding
from varprune.engine.checks import Scope, problems, unused_problems
from varprune.engine.config import TrainConfig
from varprune.engine.identity import check_same_data, other_data_line, recorded_identity
from varprune.engine.methods import build_optimizer, build_regularizers, get_method
from varprune.engine.resume import _restore, _rng_state, check_checkpoint
from varprune.engine.runconfig import read_resolved
from varprune.engine.rundir import CHECKPOINT, CONFIG, METRICS, TOKENIZER, WEIGHTS, RunFolder
from varprune.engine.runs import build_model, data_problems, early_memory_problems, load_data
from varprune.engine.schedule import loss_text, schedule_lines
from varprune.engine.step import lr_factor, make_train_step
from varprune.engine.textruns import epoch_problem, truncation_note, vocabulary_note
from varprune.errors import NonFiniteError, RunError, set_kept_note, short
from varprune.numerics import shards as sh
from varprune.numerics.regularizers import VarRegularizer
from varprune.report.tables import metric_info
from varprune.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_weights
from varprune.storage.files import atomic_write_text


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


def _finetune_start(cfg: TrainConfig, model, log, run=None):
    """Load the source run's final weights, prune them one-shot (the sweep's masks, or Wanda's or SparseGPT's from
    the source data's calibration inputs), and keep the mask."""
    from varprune.numerics.masking import MaskKeeper
    from varprune.numerics.pruners import prune_once
    from varprune.storage.checkpoint import load_weights
    from varprune.storage.files import file_digest

    assert cfg.finetune_from is not None  # the caller only starts a fine-tune from a source run
    source = Path(cfg.finetune_from)
    if cfg.finetune_from.startswith("hf:"):  # a model folder (finetune --model hf:DIR): the model holds its weights
        from varprune.storage.hf_folder import folder_weights_digest

        digest = folder_weights_digest(cfg.finetune_from[3:])
    else:
        load_weights(source / WEIGHTS, model)
        digest = file_digest(source / WEIGHTS)
    setting = cfg.finetune_pattern if cfg.finetune_pattern != "unstructured" else cfg.finetune_sparsity
    calibration = None
    if cfg.finetune_pruner != "magnitude" and run is not None:
        calibration = run.calibration(
            cfg.finetune_calib_samples, cfg.finetune_calib_seq_len or cfg.seq_len, cfg.finetune_calib_data, model
        )
    masks, skipped, _ = prune_once(model, cfg.finetune_pruner, setting, cfg.finetune_scope, (), calibration)
    # the pruner zeroed the weights (and SparseGPT updated the kept ones): the fine-tuning starts from them
    keeper = MaskKeeper(model, masks)
    pruned = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    log(
        f"fine-tuning {source} pruned to {100 * pruned / total:.2f}% ({cfg.finetune_pruner}, {cfg.finetune_pattern}"
        + (f", {len(skipped)} tensors left dense" if skipped else "")
        + "); pruned weights stay zero"
    )
    return keeper, digest


def weights_metadata(cfg: TrainConfig, info) -> dict[str, str]:
    return {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method, "task": info.task}


# ---------------------------------------------------------------- the loop


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    log=print,
    progress: bool = True,
    given=(),
    other_data: bool = False,
) -> dict:
    """Train one run into ``out``; return the last epoch's metrics.

    ``resume=True`` continues ``out`` from its last complete epoch (its own
    config.json is authoritative). Raises :class:`RunError` for bad input and
    :class:`NonFiniteError` when the loss or weights stop being finite. ``given``: the fields set explicitly
    (on the command line); one the method or optimizer does not read is refused (checks.unused_problems).
    ``other_data`` (``finetune --other-data``): fine-tune on text other than the source run's (engine/identity.py).
    """
    folder = RunFolder(out)
    found = (
        problems(cfg) + unused_problems(given, [cfg.method], cfg.optimizer, Scope.of_config(cfg)) + data_problems(cfg)
    )
    found += distributed.problems(cfg) + sharding.problems(cfg, distributed.env_world())
    if not found:
        found += early_memory_problems(cfg)
    if not found:
        distributed.setup(cfg.device)  # joins the torchrun job, if any (nothing happens in one process)
    if distributed.is_main():  # rank 0 owns the run folder
        found += folder.resume_problems() if resume else folder.new_run_problems(overwrite)
    distributed.raise_together(found)  # every problem at once, before any work, on every process
    if not distributed.is_main():
        log, progress = (lambda *a, **k: None), False
    with distributed.held_by_main(folder.lock):
        return _train(cfg, folder, resume, log, progress, other_data)


def _train(cfg: TrainConfig, folder: RunFolder, resume: bool, log, progress: bool, other_data: bool = False) -> dict:
    out = folder.path
    device = distributed.setup(cfg.device)  # cuda:LOCAL_RANK under torchrun
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

        state = distributed.from_main(read_checkpoint)  # rank 0 reads; every process gets it
        if state is None and distributed.from_main(lambda: (out / WEIGHTS).exists()):
            # a finished run whose checkpoint was dropped (train's last line says it may be): starting over would
            # replace the final weights
            raise RunError(
                f"{out} has finished ({WEIGHTS} is there) and has no {CHECKPOINT} to resume from (deleted?): its "
                f"weights stay as they are; to train it further, start a new run (or --overwrite this one)"
            )

    # may fail: nothing of an old run has been touched yet
    # a text run's tokenizer: its own (resume), its source run's (fine-tuning), else trained or the model folder's
    source_run = cfg.finetune_from if cfg.finetune_from and not cfg.finetune_from.startswith("hf:") else None
    tokenizer_run = out if resume and (out / TOKENIZER).exists() else (Path(source_run) if source_run else None)
    run = load_data(cfg, device, distributed.rank(), world, run=tokenizer_run)
    if run.tokenizer is not None and not resume:
        problem = epoch_problem(cfg, run.data)
        if problem:
            raise RunError(problem)
    other = None
    cut_note = truncation_note(run.data)
    if cut_note:
        log(cut_note)
    if resume:  # the data must be the run's: other classes would train on while config.json kept the old ones
        recorded = distributed.from_main(lambda: read_resolved(out))
        check_same_data(recorded, run, str(out), cfg.data_dir, offered=False)
    elif source_run:
        recorded = read_resolved(Path(source_run))
        other = check_same_data(recorded, run, source_run, cfg.data_dir, other_data)
        if other is not None:
            log(other_data_line(f"fine-tuning {source_run}", other))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, run.data.info, device, tokenizer=run.tokenizer)
    keeper, source_digest = _finetune_start(cfg, model, log, run) if cfg.finetune_from else (None, None)
    if cfg.grad_checkpoint:
        sharding.enable_grad_checkpoint(model)
    if cfg.fsdp:  # every process built the same weights (same seed): each keeps its shards from here on
        if cfg.sync_bn:
            model = distributed.convert_sync_bn(model, device)
        model = sharding.shard(model, device, run.tokenizer is not None)
        log(f"sharded over {world} processes (FSDP2): each holds 1/{world} of the weights, gradients, optimizer state")
        if state is not None:  # the checkpoint is whole (gathered): cut it like the model
            state = {
                **state,
                "model": sharding.distribute_model_state(state["model"], model),
                "optimizer": sharding.distribute_state(state["optimizer"], model),
            }
    optimizer = build_optimizer(method, model, cfg)
    if keeper is not None:
        keeper.apply_(optimizer)
    regularizers = build_regularizers(method, model, cfg)
    monitor = next((r for r in regularizers if isinstance(r, VarRegularizer)), None) or VarRegularizer(model, 0.0)
    train_loader, test_loader, task = run.train_loader, run.test_loader, run.task

    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    vocabulary = vocabulary_note(cfg, run.tokenizer, resumed=resume or cfg.finetune_from is not None)
    base_lr = cfg.lr
    history: list[dict] = []
    start_epoch = 0
    tokenizer_json = run.tokenizer.to_json() if run.tokenizer is not None else None
    resolved = {
        "train": cfg.to_dict(),
        "resolved": {
            "device": str(device),
            "device_name": describe_device(device),
            "amp": amp,
            "task": task.name,
            "metric": task.primary,
            **recorded_identity(run, tokenizer_json, cfg.vocab_size if vocabulary else None),
            **({"other_data": {"source": cfg.finetune_from, **other}} if other is not None else {}),
            **({"truncated_examples": run.data.truncated} if cut_note else {}),
            "train_examples": train_loader.num_examples,
            "test_examples": test_loader.num_examples,
            "steps_per_epoch": steps_per_epoch,
            "data_source": getattr(run.data, "source", None) or ", ".join(getattr(run.data, "files", {}).values()),
            "processes": world,
            "var_lambda": next((r.lam for r in regularizers if isinstance(r, VarRegularizer)), None),
            "var_strength": next((r.strength for r in regularizers if isinstance(r, VarRegularizer)), None),
            "psi_init": next((r.psi_init for r in regularizers if isinstance(r, VarRegularizer)), None),
            "torch": torch.__version__,
            "varprune": __version__,
            "command": " ".join(sys.argv),
        },
    }
    if state is not None:
        schedule = state.get("schedule")
        started = state.get("processes", 1)
        if isinstance(schedule, dict) and schedule.get("total_steps") != total_steps and started != world:
            raise CheckpointError(
                f"{out / CHECKPOINT} was written by {started} process(es) with "
                f"{short(schedule.get('total_steps'))} steps; with {world} the last, partial "
                f"batch of each epoch is dropped differently ({total_steps} steps): resume it "
                f"with {started} process(es)"
            )
        if isinstance(schedule, dict) and schedule.get("total_steps") != total_steps:
            raise CheckpointError(
                f"{out / CHECKPOINT} was written for {short(schedule.get('total_steps'))} steps, "
                f"but the data now gives {total_steps}: has the dataset changed? point --data-dir "
                f"at the original data or retrain with `varprune train --overwrite`"
            )
        if keeper is not None and state.get("finetune_source_sha256") != source_digest:
            raise CheckpointError(
                f"{cfg.finetune_from}/{WEIGHTS} changed since {out} started fine-tuning from it: "
                f"the mask cannot be rebuilt; start again with --overwrite"
            )
        _restore(state, out / CHECKPOINT, model, optimizer, device, train_loader)
        history = state["history"]
        start_epoch = state["epoch"]
        if start_epoch >= cfg.epochs and distributed.from_main(lambda: (out / WEIGHTS).exists()):
            if main:
                _write_metrics(out, history)
            log(f"{out} has already finished all {cfg.epochs} epochs")
            return history[-1]
        log(
            f"resuming {out} after epoch {start_epoch}/{cfg.epochs}"
            + (f" with {world} processes (it ran with {started})" if started != world else "")
        )
    elif resume:
        log(f"{out} has no complete epoch yet: starting it from the beginning")
    if start_epoch == 0:
        for line in ([vocabulary] if vocabulary else []) + schedule_lines(cfg, steps_per_epoch, warmup):
            log(line)

    # DDP (under torchrun) after the weights are final: its constructor broadcasts rank 0's to every process
    ddp = model if cfg.fsdp else distributed.wrap(model, device, cfg.sync_bn)
    forward = torch.compile(ddp) if cfg.compile else ddp
    local_first_pass = ddp.no_sync if cfg.sam_local and ddp is not model else None
    extra_state = {"processes": world, **({"finetune_source_sha256": source_digest} if keeper else {})}
    replacing = main and not resume and bool(folder.existing())
    fresh = main and not resume and not replacing
    had_checkpoint = (out / CHECKPOINT).exists()
    if replacing:
        folder.set_aside()  # kept aside until the new run's first checkpoint
    try:
        if main:
            folder.clean_temporaries()
            folder.mark()
            if not resume or not (out / CONFIG).exists():  # a resumed run's config.json stays as it was
                atomic_write_text(out / CONFIG, json.dumps(resolved, indent=2) + "\n")
            if tokenizer_json is not None and not (out / TOKENIZER).exists():
                atomic_write_text(out / TOKENIZER, tokenizer_json)
            _write_metrics(out, history)
        result = _epochs(
            cfg,
            folder,
            model,
            forward,
            optimizer,
            regularizers,
            monitor,
            task,
            train_loader,
            test_loader,
            device,
            amp,
            history,
            start_epoch,
            steps_per_epoch,
            total_steps,
            warmup,
            base_lr,
            log,
            progress,
            on_first_checkpoint=folder.commit if replacing else None,
            keeper=keeper,
            extra_state=extra_state,
            first_pass_local=local_first_pass,
        )
    except BaseException as e:
        # what a failure or an interruption leaves: said by the CLI's last line (errors.kept_note)
        if main and not (out / CHECKPOINT).exists():
            if replacing:
                folder.restore()
                note = f"the previous run in {out} was restored"
                log(f"the new run failed before its first checkpoint: the previous run in {out} is restored")
            elif fresh:
                folder.discard_new_run()  # no half-made run folder
                note = f"nothing was kept: no epoch had completed, and {out} holds no run"
            else:
                note = f"{out} is as it was"
        elif main:
            note = (
                f"completed epochs are kept (`varprune train --resume {out}` continues)"
                if (had_checkpoint or not replacing)
                else f"the new run's completed epochs are kept in {out}"
            )
        else:
            note = None
        if note is not None:
            set_kept_note(e, note)
        raise
    whole = sharding.full_model_state(model) if cfg.fsdp else None  # every process gathers
    if main:
        save_weights(out / WEIGHTS, model, weights_metadata(cfg, run.data.info), state=whole)
    return result


def _epochs(
    cfg,
    folder,
    model,
    forward,
    optimizer,
    regularizers,
    monitor,
    task,
    train_loader,
    test_loader,
    device,
    amp,
    history,
    start_epoch,
    steps_per_epoch,
    total_steps,
    warmup,
    base_lr,
    log,
    progress,
    on_first_checkpoint=None,
    keeper=None,
    extra_state=None,
    first_pass_local=None,
) -> dict:
    out = folder.path
    main, parallel = distributed.is_main(), distributed.active()
    train_step = make_train_step(
        forward,
        model,
        optimizer,
        regularizers,
        task,
        device,
        amp,
        reg_in_every_pass=cfg.reg_in_every_pass,
        grad_clip=cfg.grad_clip or 0.0,
        after_step=(lambda: keeper.apply_(optimizer)) if keeper is not None else None,
        first_pass_local=first_pass_local,
    )
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        zero = lambda dtype=torch.float32: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
        # the epoch's sums, as tensors on the device, and "_n", the current batch's size (engine/step.py)
        stats: dict[str, Any] = {
            "loss": zero(),
            "reg": zero(),
            "hits": zero(torch.long),
            "count": zero(torch.long),
            "ok": torch.ones((), dtype=torch.bool, device=device),
            "good_steps": zero(torch.long),
            "_n": 0,
        }
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
        kept = (
            f"kept the checkpoint of epoch {epoch} in {out}"
            if epoch > 0
            else f"no epoch had completed, so {out} holds no checkpoint"
        )
        # data parallel: sums over every process, and a non-finite loss on any process stops them all here
        seen = distributed.reduce_epoch_(stats, seen)
        if not bool(stats["ok"]):
            bad_step = int(stats["good_steps"]) + 1
            raise distributed.agreed(
                NonFiniteError(
                    f"non-finite loss at epoch {epoch + 1}, step {bad_step} of {steps_per_epoch}; "
                    f"{kept}; lower --lr or the regularizer strength"
                )
            )
        if not distributed.all_true(_all_finite(sh.local(t) for t in model.state_dict().values()), device):
            raise distributed.agreed(
                NonFiniteError(
                    f"non-finite weights at epoch {epoch + 1}, step {steps_per_epoch} of "
                    f"{steps_per_epoch}; {kept}; lower --lr or the regularizer strength"
                )
            )
        train_time = time.perf_counter() - t0
        if parallel:
            if not cfg.sync_bn:
                distributed.average_bn_buffers_(model)  # each process tracked the statistics of its share
            if not cfg.fsdp:  # sharded, each process holds other weights
                distributed.check_identical(model)
        variances = monitor.variances()
        # each process evaluates its share of the test set; the counts are summed
        with sharding.gathered_for_evaluation(model) if cfg.fsdp else contextlib.nullcontext():
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
            metrics["cross_entropy"] = metrics.pop("task_loss")  # the key of varprune 0.1
        history.append(metrics)
        # sharded: the checkpoint is gathered whole (every process takes part), then written by rank 0
        model_state = sharding.full_model_state(model) if cfg.fsdp else model.state_dict()
        optimizer_state = sharding.full_state(optimizer.state_dict()) if cfg.fsdp else optimizer.state_dict()
        if not main:  # rank 0 alone writes the run folder
            continue
        # the checkpoint first, then the metrics: a crash between the two is repaired by --resume
        save_checkpoint(
            out / CHECKPOINT,
            {
                "epoch": epoch + 1,
                "config": cfg.to_dict(),
                "model": model_state,
                "optimizer": optimizer_state,
                "rng": _rng_state(device, train_loader),
                "history": history,
                "schedule": {"step": (epoch + 1) * steps_per_epoch, "total_steps": total_steps, "warmup": warmup},
                **(extra_state or {}),
            },
        )
        if on_first_checkpoint is not None:
            on_first_checkpoint()
            on_first_checkpoint = None
        _write_metrics(out, history)
        shown = metric_info(task.primary)
        loss = loss_text(cfg, metrics["loss"], metrics["var_term"], bool(regularizers))
        log(
            f"epoch {epoch + 1:>3}/{cfg.epochs}  {loss}  "
            f"train {100 * metrics[task.train_key]:.2f}%  test {task.primary} "
            f"{shown.fmt(metrics[f'test_{task.primary}'])}{'%' if shown.percent else ''}  "
            f"var|w| {metrics['mean_layer_variance']:.3g}  {train_time:.1f}s"
        )
    return history[-1] if history else {}
