"""What a run is made of: its data on the device (with the task that reads it) and its model.

``load_data`` and ``build_model`` are shared by training, the pruning sweep, export, evaluation and the
analysis, so every command sees a run's data and model exactly as training did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from varprune.data import DeviceLoader, ImageData, load_dataset, locate_dataset, subset, validation_indices
from varprune.data.streaming import StreamingLoader
from varprune.device import fits_on_device
from varprune.engine.config import TrainConfig
from varprune.errors import RunError
from varprune.models import create_model
from varprune.tasks import Task, task_for

CALIBRATION_SEED = 8642  # as data.tokens: every run of a study is pruned from the same calibration draw


@dataclass
class RunData:
    """A run's data on its device: the dataset (images, or tokenized text), the task, the two loaders, and for
    text the tokenizer."""

    data: Any  # ImageData or data.TokenizedText
    task: Task
    train_loader: Any  # DeviceLoader, StreamingLoader, TokenWindowLoader or TokenExampleLoader
    test_loader: Any
    tokenizer: Any = None  # data.TextTokenizer for text runs

    @property
    def info(self):
        return self.data.info

    def calibration(self, samples: int, seq_len: int, source: str | None = None, model=None) -> list:
        """Inputs for the calibrated pruners (Wanda, SparseGPT), drawn with a fixed seed from the TRAINING split,
        never the test split: ``samples`` windows of ``seq_len`` tokens (or examples) for text, ``samples``
        images (normalised, in batches of 64) otherwise; on the loaders' device. ``source`` (``--calib-data``,
        language modeling): a local text or JSON-lines file the windows are drawn from instead, tokenized with
        the run's tokenizer (the literature calibrates on C4; JSON lines are drawn by its protocol, one window
        from one document: data.calibtext). Given the ``model`` to calibrate, inputs that would not fit in memory
        with the hidden states the pruners keep for them are refused first, in one line (engine.memory)."""
        device = self.train_loader.device
        if model is not None:
            self._check_calibration_memory(model, samples, seq_len)
        if source is not None:
            from varprune.data import calibration_windows

            if self.tokenizer is None or not self.data.streams:
                raise RunError("--calib-data applies to language-model runs; image and classification runs calibrate "
                               "on their training split")  # fmt: skip
            windows = calibration_windows(source, self.tokenizer, samples, seq_len, CALIBRATION_SEED)
            return [x.to(device) for x in windows]
        if self.tokenizer is not None:
            from varprune.data import calibration_inputs

            if self.data.examples and samples > len(self.data.examples["train"]):
                raise RunError(
                    f"--calib-samples {samples} is more than the {len(self.data.examples['train'])} training examples"
                )
            inputs = calibration_inputs(self.data, samples, seq_len)
            return [{k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device) for x in inputs]
        loader = self.train_loader
        if samples > loader.num_examples:
            raise RunError(f"--calib-samples {samples} is more than the {loader.num_examples} training images")
        g = torch.Generator().manual_seed(CALIBRATION_SEED)
        images = loader.take(torch.randperm(loader.num_examples, generator=g)[:samples])[0]
        return [loader.normalize(images[i : i + 64]) for i in range(0, len(images), 64)]

    def _check_calibration_memory(self, model, samples: int, seq_len: int) -> None:
        from varprune.engine import distributed
        from varprune.engine.memory import calibration_problem

        device = self.train_loader.device
        if self.tokenizer is not None:
            config = getattr(model, "config", None)
            positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
            if isinstance(positions, int) and seq_len > positions:
                raise RunError(
                    f"--calib-seq-len {seq_len} is more than the model's {positions} positions; use at most {positions}"
                )
            ids = torch.zeros(1, seq_len, dtype=torch.int64, device=device)
            lm = bool(self.data.streams)
            example = ids if lm else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            size, flags = (8 if lm else 16) * seq_len, "--calib-samples or --calib-seq-len"
        else:
            example = torch.zeros_like(
                self.train_loader.take(torch.zeros(1, dtype=torch.int64))[0], dtype=torch.float32
            )
            size, flags = 4 * example.numel(), "--calib-samples"
        problem = calibration_problem(model, example, size, samples, device, flags)
        # under torchrun (finetune) each process measures its own free memory: one's refusal is every one's
        distributed.raise_together([problem] if problem else [])


def data_problems(cfg: TrainConfig) -> list[str]:
    """A missing dataset, found by looking for its files (nothing is read)."""
    from varprune.data import DATASETS

    if cfg.download or not isinstance(cfg.dataset, str) or cfg.dataset not in DATASETS:
        return []
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, str):
        return []
    where = locate_dataset(cfg.dataset, cfg.data_dir, need_test=cfg.validation_fraction is None)
    return [] if where.complete else [where.not_found_message()]


def load_data(
    cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1, run: Path | None = None, tokenizer=None
) -> RunData:
    """The run's data on ``device``: the task, a shuffling, augmenting training loader, a test loader.

    Sets are held whole on the device as uint8; an image folder too large for
    that (half the device's free memory) streams through DataLoader workers.
    Text is tokenized with the run's tokenizer (``run``: an existing run's
    folder, whose tokenizer.json is used; engine/textruns.py).
    ``rank``/``world``: the loaders give this process its share (data parallel).
    """
    from varprune.data import FOLDER_SETS, dataset_info, default_data_dir
    from varprune.engine.textruns import is_text_task, load_text_data

    if is_text_task(dataset_info(cfg.dataset).task):
        text = RunData(*load_text_data(cfg, device, rank, world, run, tokenizer))
        problem = check_memory(cfg, text.info, device, tokenizer=text.tokenizer)
        if problem:
            raise RunError(problem)
        return text

    if cfg.dataset in FOLDER_SETS:  # list the folder once: it decides streaming, and decoding reuses it
        from varprune.data import folders

        root = Path(cfg.data_dir or default_data_dir(cfg.dataset))
        listing = folders.scan(cfg.dataset, root)
        size = cfg.image_size or folders.DEFAULT_SIZE[cfg.dataset]
        if not fits_on_device(folders.estimate_bytes(listing.num_images, 3, size), device):
            if world > 1:
                raise RunError(
                    f"{cfg.dataset} is too large for {device} and would be streamed from its files, "
                    f"which is not sharded across processes yet; train it in one process"
                )
            return _streaming_data(cfg, device, listing, size)
        data = folders.load(cfg.dataset, root, image_size=cfg.image_size, listing=listing)
    else:
        loaded = load_dataset(
            cfg.dataset, cfg.data_dir, cfg.download, cfg.image_size, need_test=cfg.validation_fraction is None
        )
        assert isinstance(loaded, ImageData), "text sets are loaded above (is_text_task)"
        data = loaded
    task = task_for(data.info)
    tx, ty, vx, vy = data.train_x, data.train_y, data.test_x, data.test_y
    if cfg.validation_fraction is not None:  # tuning: the "test" loader is a validation split of the training set
        keep, held = validation_indices(len(tx), cfg.validation_fraction)
        tx, ty, vx, vy = tx[keep], ty[keep], tx[held], ty[held]
    tx, ty = subset(tx, ty, cfg.limit_train, salt=0)
    vx, vy = subset(vx, vy, cfg.limit_test, salt=1)
    if len(tx) < 2 * world:
        raise RunError(
            f"{cfg.dataset} has {len(tx)} training example(s) here; BatchNorm needs at least 2"
            + (f" per process ({world} processes)" if world > 1 else "")
            + ": raise --limit-train or check the data folder"
        )
    memory_problem = check_memory(
        cfg, data.info, device, data_bytes=sum(t.numel() * t.element_size() for t in (tx, ty, vx, vy))
    )
    if memory_problem:
        raise RunError(memory_problem)
    if len(vx) == 0:
        raise RunError(
            f"{cfg.dataset} has no test examples in {data.source}; the test split is needed to "
            f"measure anything: check the data folder"
        )
    train_loader = DeviceLoader(
        tx,
        ty,
        data.info,
        cfg.batch_size,
        train=True,
        device=device,
        seed=cfg.seed,
        augment=task.augment if cfg.augment else None,
        channels_last=cfg.channels_last,
        rank=rank,
        world=world,
    )
    test_loader = DeviceLoader(
        vx,
        vy,
        data.info,
        max(cfg.batch_size, 500),
        train=False,
        device=device,
        channels_last=cfg.channels_last,
        rank=rank,
        world=world,
    )
    return RunData(data, task, train_loader, test_loader)


def _streaming_data(cfg: TrainConfig, device: torch.device, listing, size: int) -> RunData:
    """RunData streaming an image folder from its files (it does not fit on the device)."""
    from varprune.data.streaming import streaming_info

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
    train_loader = StreamingLoader(
        tf,
        tl,
        info,
        cfg.batch_size,
        train=True,
        device=device,
        seed=cfg.seed,
        augment=task.augment if cfg.augment else None,
        channels_last=cfg.channels_last,
    )
    test_loader = StreamingLoader(
        vf, vl, info, max(cfg.batch_size, 500), train=False, device=device, channels_last=cfg.channels_last
    )
    empty = torch.zeros(0, dtype=torch.uint8)
    data = ImageData(info, empty, empty, empty, empty, f"{listing.root} (streamed: too large for {device})")
    return RunData(data, task, train_loader, test_loader)


def model_arguments(cfg: TrainConfig, info, tokenizer=None) -> tuple[tuple, dict]:
    """``create_model``'s arguments for the run's data: image shape, classes, and for text the tokenizer's
    vocabulary and padding and the sequence length (engine/textruns.model_sizes)."""
    if tokenizer is not None:
        from varprune.engine.textruns import model_sizes

        return (0, max(info.num_classes, 2), 0), {**cfg.model_args, **model_sizes(cfg, info, tokenizer)}
    return (info.channels, info.num_classes, info.size), dict(cfg.model_args)


def build_model(cfg: TrainConfig, info, device: torch.device, tokenizer=None) -> torch.nn.Module:
    """The configured model for the data's shape (``--init`` weights loaded, if given)."""
    args, kwargs = model_arguments(cfg, info, tokenizer)
    model = create_model(cfg.model, *args, **kwargs)
    if cfg.init:
        from varprune.storage.init_weights import load_initial_weights

        load_initial_weights(model, cfg.init, cfg.init_exclude or ())
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def check_memory(cfg: TrainConfig, info, device: torch.device, data_bytes: int = 0, tokenizer=None) -> str | None:
    """Would this run fit in ``device``'s free memory? A one-line problem naming the flag to change, or None.

    The model is built on the meta device (no storage) for its size and one forward pass (engine/memory.py);
    ``data_bytes`` counts only where the data moves to another device (on the CPU it is already in memory).
    """
    from varprune.engine import memory
    from varprune.models.registry import ModelError

    args, kwargs = model_arguments(cfg, info, tokenizer)
    try:
        with torch.device("meta"):
            model = create_model(cfg.model, *args, **kwargs)
            example = (
                torch.zeros((1, cfg.seq_len), dtype=torch.long)
                if tokenizer is not None
                else torch.zeros((1, info.channels, info.size, info.size))
            )
    except ModelError as e:  # an option out of its range: say which flag set it
        option = str(e).split(" ", 1)[0]
        raise RunError(f"--model-arg {e}" if option in cfg.model_args else str(e)) from None
    if cfg.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return (
            f"--batch-size {cfg.batch_size}: {cfg.model} has BatchNorm, which cannot normalise a batch of one; "
            f"use --batch-size 2 or more"
        )
    on_device = data_bytes if device.type != "cpu" else 0
    windows = (cfg.limit_train or 0) if tokenizer is not None and info.task == "language-modeling" else 0
    est = memory_estimate(cfg, model, example, on_device, tokenizer is not None, windows)
    if isinstance(est, str):
        return est
    return memory.fits_problem(
        est,
        device,
        {
            "data": "--image-size",
            "parameters": "the model's size (--model-arg)",
            "activations": "--batch-size or --image-size" if tokenizer is None else "--batch-size or --seq-len",
            "window index": "--limit-train (training windows an epoch; more --epochs train as long)",
        },
    )


def memory_estimate(cfg: TrainConfig, model_on_meta, example, data_bytes: int, text: bool, windows: int = 0):
    """engine.memory's estimate for this configuration (``--fsdp`` over torchrun's processes,
    ``--grad-checkpoint``; ``windows``: a language model's window index), or the one-line problem of a model
    those flags cannot apply to."""
    from varprune.engine import distributed, memory, sharding
    from varprune.engine.methods import get_method

    problem = sharding.model_problem(cfg, model_on_meta, text)
    if problem:
        return problem
    units = sharding.units(model_on_meta, text) if (cfg.fsdp or cfg.grad_checkpoint) else None
    shards = distributed.env_world() if cfg.fsdp else 1
    return memory.estimate(
        model_on_meta,
        example,
        cfg.batch_size,
        cfg.optimizer,
        get_method(cfg.method).optimizer,
        data_bytes,
        windows,
        shards=shards,
        units=units,
        checkpointed=cfg.grad_checkpoint,
    )


def early_memory_problems(cfg: TrainConfig) -> list[str]:
    """:func:`check_memory` before any data is read, on the shape the dataset declares (or will be resized to):
    a model or batch that cannot fit is refused in a second, not after minutes of loading."""
    import dataclasses as dc

    from varprune.data import dataset_info
    from varprune.device import resolve_device

    try:
        info = dataset_info(cfg.dataset)
        device = resolve_device(cfg.device)
    except ValueError:
        return []  # reported by the configuration's own checks
    from types import SimpleNamespace

    from varprune.engine.textruns import is_text_task

    tokenizer = None
    if is_text_task(info.task):
        if cfg.model.startswith("hf:"):
            return []  # the folder's own vocabulary: checked once its tokenizer is read
        tokenizer = SimpleNamespace(vocab_size=cfg.vocab_size, pad_id=0)  # the vocabulary it will be trained to
    guess = dc.replace(
        info, channels=info.channels or 3, size=cfg.image_size or info.size or 32, num_classes=info.num_classes or 2
    )
    try:
        problem = check_memory(cfg, guess, device, tokenizer=tokenizer)
    except RunError as e:
        return [str(e)]
    return [problem] if problem else []


def data_fingerprint(cfg: TrainConfig) -> dict:
    """Which data a measurement was made on, cheaply (no file is read): the dataset, its resolved folder, the size,
    number and modification time of the files the family found there, and the settings that shape the test set.
    A result is reused only on the same fingerprint (prune RUN, then prune RUN --data-dir OTHER, sweeps again)."""
    import hashlib
    import os

    from varprune.data import default_data_dir

    root = Path(cfg.data_dir if cfg.data_dir is not None else default_data_dir(cfg.dataset))
    h = hashlib.sha256()
    try:
        where = locate_dataset(cfg.dataset, cfg.data_dir, need_test=cfg.validation_fraction is None)
        for path in sorted(map(str, where.found)):
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except (OSError, ValueError):
        pass
    return {
        "dataset": cfg.dataset,
        "dir": str(root.resolve()),
        "files": h.hexdigest()[:16],
        "image_size": cfg.image_size,
        "limit_test": cfg.limit_test,
    }
