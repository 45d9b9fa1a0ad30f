"""One training loop for every method.

A run folder holds:

* ``config.json``        the resolved configuration (everything needed to rerun);
* ``metrics.jsonl``      one line per epoch;
* ``checkpoint.safetensors``  the state after the last complete epoch (weights,
  optimizer, RNG states, metrics history), written atomically every epoch,
  from which ``--resume`` continues;
* ``model.safetensors``  the final weights, once training has finished.

The hot loop never synchronises with the host: loss sums, accuracy counts and
the non-finite check accumulate in device tensors and are read once per epoch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint, save_weights
from .data import DeviceLoader, dataset_info, load_dataset, subset
from .device import autocast, describe_device, resolve_amp, resolve_device
from .evaluate import accuracy
from .methods import build_optimizer, build_regularizers, get_method
from .models import create_model
from .regularizers import VarRegularizer

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, WEIGHTS)


class RunError(ValueError):
    """A problem with a run folder or its configuration (exit code 2)."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weight (exit code 3)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; written to ``config.json``."""
    dataset: str = "fashion-mnist"
    model: str = "resnet18"
    method: str = "sgd"
    epochs: int = 15
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    var_lambda: float = 1e-6
    var_r: float = 1e-8
    var_eps: float = 1e-8
    l1_alpha: float = 1e-5
    hoyer_alpha: float = 1e-6
    rho: float | None = None
    cram_sparsities: list[float] | None = None
    seed: int = 0
    data_dir: str | None = None
    download: bool = False
    limit_train: int | None = None
    limit_test: int | None = None
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = False
    compile: bool = False
    augment: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RunError(f"config has unknown keys {unknown}; is it from another varprune version?")
        return cls(**d)


def validate_config(cfg: TrainConfig) -> list[str]:
    """Every problem with a configuration, as one-line messages (empty if fine)."""
    from .data import DATASETS
    from .methods import METHODS
    from .models import list_models
    problems = []
    if cfg.dataset not in DATASETS:
        problems.append(f"unknown dataset {cfg.dataset!r} (choose from {', '.join(sorted(DATASETS))})")
    if cfg.model not in list_models():
        problems.append(f"unknown model {cfg.model!r} (choose from {', '.join(list_models())})")
    if cfg.method not in METHODS:
        problems.append(f"unknown method {cfg.method!r} (choose from {', '.join(METHODS)})")
    checks = [
        (cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}"),
        (cfg.batch_size > 0, f"--batch-size must be > 0, got {cfg.batch_size}"),
        (cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}"),
        (0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}"),
        (cfg.var_lambda >= 0 and math.isfinite(cfg.var_lambda), f"--var-lambda must be >= 0, got {cfg.var_lambda}"),
        (cfg.var_r > 0, f"--var-r must be > 0, got {cfg.var_r}"),
        (cfg.var_eps > 0, f"--var-eps must be > 0, got {cfg.var_eps}"),
        (cfg.l1_alpha >= 0, f"--l1-alpha must be >= 0, got {cfg.l1_alpha}"),
        (cfg.hoyer_alpha >= 0, f"--hoyer-alpha must be >= 0, got {cfg.hoyer_alpha}"),
        (cfg.rho is None or cfg.rho > 0, f"--rho must be > 0, got {cfg.rho}"),
        (cfg.limit_train is None or cfg.limit_train > 0, f"--limit-train must be > 0, got {cfg.limit_train}"),
        (cfg.limit_test is None or cfg.limit_test > 0, f"--limit-test must be > 0, got {cfg.limit_test}"),
    ]
    problems += [msg for ok, msg in checks if not ok]
    if cfg.cram_sparsities is not None:
        bad = [s for s in cfg.cram_sparsities if not 0 <= s < 1]
        if bad or not cfg.cram_sparsities:
            problems.append(f"--cram-sparsities must be non-empty values in [0, 1), got {cfg.cram_sparsities}")
    return problems


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to silently replace a run; ``overwrite`` removes the old run's files."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise RunError(f"{out} already holds a run ({', '.join(existing)}); use --resume {out} to continue it, "
                       f"--overwrite to replace it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out / name).unlink()


def load_run_config(run: Path) -> TrainConfig:
    path = Path(run) / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{run} is not a varprune run folder (no config.json); train one with `varprune train`") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}); the run folder is damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise RunError(f"{path} is not a varprune run configuration")
    try:
        return TrainConfig.from_dict(data["train"])
    except TypeError as e:
        raise RunError(f"{path} is malformed ({e})") from None


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    info = dataset_info(cfg.dataset)
    model = create_model(cfg.model, info.channels, info.num_classes, info.size).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_data(cfg: TrainConfig, device: torch.device):
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    tx, ty = subset(data.train_x, data.train_y, cfg.limit_train, salt=0)
    vx, vy = subset(data.test_x, data.test_y, cfg.limit_test, salt=1)
    train_loader = DeviceLoader(tx, ty, data.info, cfg.batch_size, train=True, device=device, seed=cfg.seed,
                                augment=cfg.augment, channels_last=cfg.channels_last)
    test_loader = DeviceLoader(vx, vy, data.info, max(cfg.batch_size, 500), train=False, device=device,
                               channels_last=cfg.channels_last)
    return data, train_loader, test_loader


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


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
          log=print, progress: bool = True) -> dict:
    """Train one run into ``out``; return the last epoch's metrics.

    ``resume=True`` continues ``out`` from its last complete epoch (its own
    config.json is authoritative). Raises :class:`RunError` for bad input and
    :class:`NonFiniteError` when the loss or weights stop being finite.
    """
    out = Path(out)
    problems = validate_config(cfg)
    if problems:
        raise RunError("; ".join(problems))
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    method = get_method(cfg.method)
    if resume:
        state = load_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).exists() else None
    else:
        prepare_run_dir(out, overwrite)
        state = None

    data, train_loader, test_loader = load_data(cfg, device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    optimizer = build_optimizer(method, model, cfg)
    regularizers = build_regularizers(method, model, cfg)
    monitor = next((r for r in regularizers if isinstance(r, VarRegularizer)), None) or VarRegularizer(model, 0.0)
    forward = torch.compile(model) if cfg.compile else model

    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
    base_lr = cfg.lr
    history: list[dict] = []
    start_epoch = 0

    resolved = {"train": asdict(cfg), "resolved": {
        "device": str(device), "device_name": describe_device(device), "amp": amp,
        "train_examples": len(train_loader.images), "test_examples": len(test_loader.images),
        "steps_per_epoch": steps_per_epoch, "data_source": data.source,
        "torch": torch.__version__, "varprune": __version__, "command": " ".join(sys.argv)}}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], device, train_loader)
        history = state["history"]
        start_epoch = state["epoch"]
        log(f"resuming {out} after epoch {start_epoch}/{cfg.epochs}")
    else:
        atomic_write_text(out / "config.json", json.dumps(resolved, indent=2) + "\n")
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))

    two_pass = getattr(optimizer, "caller_runs_first_pass", None)

    def forward_backward(x, y, stats):
        with autocast(device, amp):
            logits = forward(x)
            ce = F.cross_entropy(logits, y)
        ce.backward()
        reg_value = sum((r.apply_gradient_() for r in regularizers), torch.zeros((), device=device))
        if stats is not None:  # first pass only: what the epoch line reports
            stats["ce"] += ce.detach() * len(y)
            stats["reg"] += reg_value * len(y)
            stats["correct"] += (logits.detach().argmax(1) == y).sum()
            stats["ok"] &= torch.isfinite(ce.detach())
            stats["good_steps"] += stats["ok"].long()
        return ce

    def second_pass(x, y):
        from .optim import frozen_bn_stats
        with frozen_bn_stats(model):  # BN statistics are updated by the first pass only
            return forward_backward(x, y, None)

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        zero = lambda dtype=torch.float32: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
        stats = {"ce": zero(), "reg": zero(), "correct": zero(torch.long), "ok": torch.ones((), dtype=torch.bool,
                 device=device), "good_steps": zero(torch.long)}
        bar = _Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", progress)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(train_loader):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = base_lr * lr_factor(step, total_steps, warmup)
            optimizer.zero_grad(set_to_none=True)
            if two_pass is None:            # plain optimizer
                forward_backward(x, y, stats)
                optimizer.step()
            elif two_pass:                  # SAM, CrAM: caller's pass, then the perturbed pass
                forward_backward(x, y, stats)
                optimizer.step(lambda: second_pass(x, y))
            else:                           # S2-SAM: its one pass happens inside step
                optimizer.step(lambda: forward_backward(x, y, stats))
            bar.update()
        bar.close()
        n = len(train_loader.images)
        if not bool(stats["ok"]):
            bad_step = int(stats["good_steps"]) + 1
            raise NonFiniteError(f"non-finite loss at epoch {epoch + 1}, step {bad_step} of {steps_per_epoch}; "
                                 f"kept the checkpoint of epoch {epoch} in {out}; lower --lr or the regularizer "
                                 f"strength")
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteError(f"non-finite weights after epoch {epoch + 1}, step {steps_per_epoch}; "
                                 f"kept the checkpoint of epoch {epoch} in {out}")
        train_time = time.perf_counter() - t0
        variances = monitor.variances()
        metrics = {
            "epoch": epoch + 1,
            "loss": float(stats["ce"] + stats["reg"]) / n,
            "cross_entropy": float(stats["ce"]) / n,
            "var_term": float(stats["reg"]) / n if method.regularizers else 0.0,
            "train_accuracy": float(stats["correct"]) / n,
            "test_accuracy": accuracy(model, test_loader, amp),
            "mean_layer_variance": sum(variances.values()) / len(variances),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": train_time,
        }
        history.append(metrics)
        save_checkpoint(out / CHECKPOINT, {
            "epoch": epoch + 1, "config": asdict(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": _rng_state(device, train_loader), "history": history})
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {metrics['loss']:.4f}  "
            f"train {100 * metrics['train_accuracy']:.2f}%  test {100 * metrics['test_accuracy']:.2f}%  "
            f"var|w| {metrics['mean_layer_variance']:.3g}  {train_time:.1f}s")
    save_weights(out / WEIGHTS, model, {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method})
    return history[-1] if history else {}


def copy_run(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
