"""One training loop for every method.

A run folder holds:

* ``config.json``        the resolved configuration (everything needed to rerun);
* ``metrics.jsonl``      one line per epoch;
* ``checkpoint.safetensors``  the state after the last complete epoch (weights,
  optimizer and method state, RNG states, metrics history), written atomically
  every epoch, from which ``--resume`` continues;
* ``model.safetensors``  the final weights, once training has finished.

Every file is written atomically (temporary file, fsync, rename), checkpoint
first: a run killed at any moment resumes from its last complete epoch and, on
the CPU, ends bitwise identical to an uninterrupted run. metrics.jsonl is
rewritten from the checkpoint's history, so it never runs ahead of or behind it.

The hot loop never synchronises with the host: loss sums, accuracy counts and
the non-finite check accumulate in device tensors and are read once per epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .checkpoint import (CheckpointError, atomic_write_text, load_checkpoint, load_model_state,
                         remove_stale_temporaries, save_checkpoint, save_weights)
from .data import DeviceLoader, dataset_info, load_dataset, locate_dataset, subset
from .device import AMP_MODES, autocast, describe_device, resolve_amp, resolve_device
from .evaluate import accuracy
from .methods import build_optimizer, build_regularizers, get_method
from .models import create_model
from .regularizers import VarRegularizer

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
RUN_FILES = ("config.json", "metrics.jsonl", CHECKPOINT, WEIGHTS)
DERIVED_FILES = ("prune.json", "prune.csv", "prune.png")   # made from WEIGHTS; stale once it is replaced
# settings that say where things are, not what is computed: a checkpoint may be resumed with others
LOCATION_KEYS = ("device", "data_dir", "download")


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
        """A configuration from JSON; wrong keys or types are one :class:`RunError` naming them all."""
        if not isinstance(d, dict):
            raise RunError(f"a configuration must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - names))
        problems = [f"unknown keys {_short(unknown)}; is it from another varprune version?"] if unknown else []
        problems += _type_problems(d)
        if problems:
            raise RunError("config " + "; ".join(problems))
        values = dict(d)
        for f in dataclasses.fields(cls):  # JSON writes 1.0 as 1: floats become floats again
            if f.name in values and values[f.name] is not None:
                if f.type.startswith("float"):
                    values[f.name] = float(values[f.name])
                elif f.type.startswith("list[float]"):
                    values[f.name] = [float(v) for v in values[f.name]]
        return cls(**values)


def _short(value, limit: int = 60) -> str:
    """``repr(value)`` on one line, at most ``limit`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _plain(obj) -> bool:
    """Only JSON values (no tensors) in a nested structure."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(map(_plain, obj))
    return obj is None or isinstance(obj, (bool, int, float, str))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        float(v)
    except OverflowError:   # an int beyond float range
        return False
    return True


_TYPE_CHECKS = {"int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool),
                "str": lambda v: isinstance(v, str), "dict": lambda v: isinstance(v, dict),
                "list[float]": lambda v: isinstance(v, list) and all(map(_is_number, v)),
                "None": lambda v: v is None}


def _type_problems(values: dict) -> list[str]:
    """Fields of ``values`` whose type does not match TrainConfig's annotation."""
    problems = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in values:
            kinds = [k.strip() for k in f.type.split("|")]
            if not any(_TYPE_CHECKS[k](values[f.name]) for k in kinds):
                problems.append(f"{f.name} must be {' or '.join(kinds)}, got {_short(values[f.name])}")
    return problems


def _finite(v) -> bool:
    return math.isfinite(float(v))


def validate_config(cfg: TrainConfig, check_device: bool = True) -> list[str]:
    """Every problem with a configuration, as one-line messages (empty if fine).

    Checks types, ranges and names; ``check_device`` also checks that the
    device exists on this machine. Nothing is loaded or written.
    """
    from .data import DATASETS
    from .methods import METHODS
    from .models import list_models
    problems = _type_problems(dataclasses.asdict(cfg))
    bad_type = {p.split(" ", 1)[0] for p in problems}
    fine = lambda *names: not bad_type.intersection(names)  # noqa: E731
    if fine("dataset") and cfg.dataset not in DATASETS:
        problems.append(f"unknown dataset {_short(cfg.dataset)} (choose from {', '.join(sorted(DATASETS))})")
    if fine("model") and cfg.model not in list_models():
        problems.append(f"unknown model {_short(cfg.model)} (choose from {', '.join(list_models())})")
    if fine("method") and cfg.method not in METHODS:
        problems.append(f"unknown method {_short(cfg.method)} (choose from {', '.join(METHODS)})")
    if fine("amp") and cfg.amp not in AMP_MODES:
        problems.append(f"unknown --amp {_short(cfg.amp)} (choose from {', '.join(AMP_MODES)})")
    if fine("device"):
        try:
            device = resolve_device(cfg.device) if check_device else None
            if not check_device and cfg.device != "auto":
                torch.device(cfg.device)
        except (ValueError, RuntimeError) as e:
            problems.append(str(e) if check_device else f"unknown device {_short(cfg.device)}")
        else:
            if device is not None and device.type not in ("cpu", "cuda"):
                problems.append(f"device {_short(cfg.device)} is not supported; use auto, cpu, cuda or cuda:N")
    checks = [
        ("epochs", lambda: cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}"),
        ("batch_size", lambda: cfg.batch_size > 0, f"--batch-size must be > 0, got {cfg.batch_size}"),
        ("lr", lambda: cfg.lr > 0 and _finite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}"),
        ("momentum", lambda: 0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}"),
        ("weight_decay", lambda: cfg.weight_decay >= 0 and _finite(cfg.weight_decay),
         f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        ("warmup_epochs", lambda: cfg.warmup_epochs >= 0 and _finite(cfg.warmup_epochs),
         f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}"),
        ("var_lambda", lambda: cfg.var_lambda >= 0 and _finite(cfg.var_lambda),
         f"--var-lambda must be >= 0, got {cfg.var_lambda}"),
        ("var_r", lambda: cfg.var_r > 0 and _finite(cfg.var_r), f"--var-r must be > 0, got {cfg.var_r}"),
        ("var_eps", lambda: cfg.var_eps > 0 and _finite(cfg.var_eps), f"--var-eps must be > 0, got {cfg.var_eps}"),
        ("l1_alpha", lambda: cfg.l1_alpha >= 0 and _finite(cfg.l1_alpha), f"--l1-alpha must be >= 0, got {cfg.l1_alpha}"),
        ("hoyer_alpha", lambda: cfg.hoyer_alpha >= 0 and _finite(cfg.hoyer_alpha),
         f"--hoyer-alpha must be >= 0, got {cfg.hoyer_alpha}"),
        ("rho", lambda: cfg.rho is None or (cfg.rho > 0 and _finite(cfg.rho)), f"--rho must be > 0, got {cfg.rho}"),
        ("seed", lambda: 0 <= cfg.seed < 2 ** 63, f"--seed must be in [0, 2^63), got {cfg.seed}"),
        ("limit_train", lambda: cfg.limit_train is None or cfg.limit_train > 0,
         f"--limit-train must be > 0, got {cfg.limit_train}"),
        ("limit_test", lambda: cfg.limit_test is None or cfg.limit_test > 0,
         f"--limit-test must be > 0, got {cfg.limit_test}"),
    ]
    problems += [msg for name, ok, msg in checks if fine(name) and not ok()]
    if fine("cram_sparsities") and cfg.cram_sparsities is not None:
        bad = [s for s in cfg.cram_sparsities if not 0 <= s < 1]
        if bad or not cfg.cram_sparsities:
            problems.append(f"--cram-sparsities must be non-empty values in [0, 1), got {_short(cfg.cram_sparsities)}")
        elif len(set(cfg.cram_sparsities)) != len(cfg.cram_sparsities):
            problems.append(f"--cram-sparsities must be unique, got {_short(cfg.cram_sparsities)}")
    return problems


def data_problems(cfg: TrainConfig) -> list[str]:
    """A missing dataset, found by looking for its files (nothing is read)."""
    from .data import DATASETS
    if cfg.download or not isinstance(cfg.dataset, str) or cfg.dataset not in DATASETS:
        return []
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
        return []
    where = locate_dataset(cfg.dataset, cfg.data_dir)
    return [] if where.complete else [where.not_found_message()]


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


def run_dir_problems(out: Path, overwrite: bool) -> list[str]:
    """Why ``out`` cannot receive a new run (empty if it can)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return [f"{out} exists and is not a folder; choose another --out"]
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        return [f"{out} already holds a run ({', '.join(existing)}); use --resume {out} to continue it, "
                f"--overwrite to replace it, or choose another --out"]
    return []


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to silently replace a run; ``overwrite`` removes the old run's files
    (and the prune results made from its weights)."""
    out = Path(out)
    problems = run_dir_problems(out, overwrite)
    if problems:
        raise RunError(problems[0])
    try:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        # config.json first: a folder caught half-cleared is never mistaken for the old run by --resume
        for name in RUN_FILES + DERIVED_FILES:
            if (out / name).exists():
                (out / name).unlink()
    except OSError as e:
        raise RunError(f"cannot prepare {out} ({e.strerror or e}); choose another --out") from None


def load_run_config(run: Path) -> TrainConfig:
    """A run folder's configuration, checked; any problem is one :class:`RunError` line."""
    run = Path(run)
    path = run / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if run.is_dir() and any((run / name).exists() for name in RUN_FILES):
            raise RunError(f"{run} has no config.json but holds run files: the folder is damaged; retrain it with "
                           f"`varprune train --overwrite --out {run} ...`") from None
        if run.is_dir() and any(run.glob(".config.json.*.tmp")):
            raise RunError(f"{run} was interrupted before its configuration was written, so nothing can be "
                           f"resumed; start it again with `varprune train --out {run} ...`") from None
        raise RunError(f"{run} is not a varprune run folder (no config.json); train one with "
                       f"`varprune train --out {run} ...`") from None
    except (OSError, ValueError, RecursionError) as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}); the run folder is damaged") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise RunError(f"{path} is not a varprune run configuration")
    try:
        cfg = TrainConfig.from_dict(data["train"])
    except RunError as e:
        raise RunError(f"{path}: {e}") from None
    problems = validate_config(cfg, check_device=False)
    if problems:
        raise RunError(f"{path}: " + "; ".join(problems))
    return cfg


def _check_checkpoint(state: dict, cfg: TrainConfig, path: Path) -> None:
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
    own = {k: v for k, v in asdict(cfg).items() if k not in LOCATION_KEYS}
    theirs = {k: v for k, v in state["config"].items() if k not in LOCATION_KEYS}
    if own != theirs:
        diff = sorted(k for k in set(own) | set(theirs) if own.get(k, "?") != theirs.get(k, "?"))
        detail = ", ".join(f"{k} {_short(theirs.get(k), 30)} vs {_short(own.get(k), 30)}" for k in diff[:3])
        raise CheckpointError(f"{path} belongs to another run ({detail} in config.json); "
                              f"was it copied from elsewhere? retrain with `varprune train --overwrite`")
    if not 0 < state["epoch"] <= cfg.epochs:
        raise bad(f"epoch {state['epoch']} of {cfg.epochs}")


def _restore(state: dict, path: Path, model, optimizer, device: torch.device, loader: DeviceLoader) -> None:
    load_model_state(model, state["model"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path} holds optimizer state of another method or model "
                              f"({type(e).__name__}); retrain with `varprune train --overwrite`") from None
    try:
        _set_rng_state(state["rng"], device, loader)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} holds an invalid RNG state ({type(e).__name__}); "
                              f"retrain with `varprune train --overwrite`") from None


def _write_metrics(out: Path, history: list[dict]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))


def _all_finite(tensors) -> bool:
    """One host sync for all tensors (floating ones; integer buffers are always finite)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


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
    problems = validate_config(cfg) + data_problems(cfg)
    if not resume:
        problems += run_dir_problems(out, overwrite)
    elif out.exists() and not out.is_dir():
        problems.append(f"{out} is not a run folder")
    if problems:  # every problem at once, before any work
        raise RunError("; ".join(problems))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out} ({e.strerror or e}); choose another --out") from None
    with _run_lock(out):
        return _train(cfg, out, resume, overwrite, log, progress)


@contextlib.contextmanager
def _run_lock(out: Path):
    """Hold ``out/.lock`` while training: a second process on the same folder is refused
    (the kernel drops the lock when its holder dies, however it dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    try:
        f = open(out / ".lock", "a+")
    except OSError as e:
        raise RunError(f"cannot write to {out} ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunError(f"{out} is being trained by another varprune process; wait for it or choose "
                           f"another --out") from None
        yield
    finally:
        f.close()


def make_train_step(forward, model, optimizer, regularizers, device: torch.device, amp: str):
    """One optimisation step for any method: ``step(x, y, stats=None)``.

    ``forward`` is the (possibly compiled) model. Regularizer gradients are added
    after every backward pass, so in ``var+sam`` VAR's term enters both passes.
    ``stats`` (device tensors) accumulate the first pass's loss, accuracy and a
    finite flag without synchronising with the host.
    """
    from .optim import frozen_bn_stats
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
            stats["ok"] &= torch.isfinite(ce.detach()) & torch.isfinite(reg_value)
            stats["good_steps"] += stats["ok"].long()
        return ce

    def second_pass(x, y):
        with frozen_bn_stats(model):  # BN statistics are updated by the first pass only
            return forward_backward(x, y, None)

    def step(x, y, stats=None):
        optimizer.zero_grad(set_to_none=True)
        if two_pass is None:            # plain optimizer
            forward_backward(x, y, stats)
            optimizer.step()
        elif two_pass:                  # SAM, CrAM: caller's pass, then the perturbed pass
            forward_backward(x, y, stats)
            optimizer.step(lambda: second_pass(x, y))
        else:                           # S2-SAM: its one pass happens inside step
            optimizer.step(lambda: forward_backward(x, y, stats))

    return step


def _train(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool, log, progress: bool) -> dict:
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    method = get_method(cfg.method)
    state = None
    if resume:
        remove_stale_temporaries(out)  # what a write interrupted by a crash left behind
        if (out / CHECKPOINT).exists():
            state = load_checkpoint(out / CHECKPOINT)
            _check_checkpoint(state, cfg, out / CHECKPOINT)
    else:
        prepare_run_dir(out, overwrite)

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
        schedule = state.get("schedule")
        if isinstance(schedule, dict) and schedule.get("total_steps") != total_steps:
            raise CheckpointError(f"{out / CHECKPOINT} was written for {_short(schedule.get('total_steps'))} steps, "
                                  f"but the data now gives {total_steps}: has the dataset changed? point --data-dir "
                                  f"at the original data or retrain with `varprune train --overwrite`")
        _restore(state, out / CHECKPOINT, model, optimizer, device, train_loader)
        history = state["history"]
        start_epoch = state["epoch"]
        if start_epoch >= cfg.epochs and (out / WEIGHTS).exists():
            _write_metrics(out, history)
            log(f"{out} has already finished all {cfg.epochs} epochs")
            return history[-1]
        log(f"resuming {out} after epoch {start_epoch}/{cfg.epochs}")
    elif resume:
        log(f"{out} has no complete epoch yet: starting it from the beginning")
    if not resume or not (out / "config.json").exists():  # a resumed run's config.json stays as it was
        atomic_write_text(out / "config.json", json.dumps(resolved, indent=2) + "\n")
    _write_metrics(out, history)

    train_step = make_train_step(forward, model, optimizer, regularizers, device, amp)

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
            train_step(x, y, stats)
            bar.update()
        bar.close()
        n = len(train_loader.images)
        kept = (f"kept the checkpoint of epoch {epoch} in {out}" if epoch > 0 else
                f"no epoch had completed, so {out} holds no checkpoint")
        if not bool(stats["ok"]):
            bad_step = int(stats["good_steps"]) + 1
            raise NonFiniteError(f"non-finite loss at epoch {epoch + 1}, step {bad_step} of {steps_per_epoch}; "
                                 f"{kept}; lower --lr or the regularizer strength")
        if not _all_finite(model.state_dict().values()):
            raise NonFiniteError(f"non-finite weights at epoch {epoch + 1}, step {steps_per_epoch} of "
                                 f"{steps_per_epoch}; {kept}; lower --lr or the regularizer strength")
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
        # the checkpoint first, then the metrics: a crash between the two is repaired by --resume
        save_checkpoint(out / CHECKPOINT, {
            "epoch": epoch + 1, "config": asdict(cfg), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": _rng_state(device, train_loader), "history": history,
            "schedule": {"step": (epoch + 1) * steps_per_epoch, "total_steps": total_steps, "warmup": warmup}})
        _write_metrics(out, history)
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {metrics['loss']:.4f}  "
            f"train {100 * metrics['train_accuracy']:.2f}%  test {100 * metrics['test_accuracy']:.2f}%  "
            f"var|w| {metrics['mean_layer_variance']:.3g}  {train_time:.1f}s")
    save_weights(out / WEIGHTS, model, {"model": cfg.model, "dataset": cfg.dataset, "method": cfg.method})
    return history[-1] if history else {}


