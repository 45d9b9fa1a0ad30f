"""Finished runs, loaded: their configuration, final weights and data, and the inputs the protocol draws from
them (BN re-tuning images, calibration inputs for Wanda and SparseGPT, fixed batches for the analysis).

Used by the pruning sweep, export, analysis and studies; a run's weights and checkpoint are only read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from varprune.device import resolve_amp, resolve_device
from varprune.engine.config import TrainConfig
from varprune.engine.identity import check_same_data, run_tokenizer_problem
from varprune.engine.runconfig import load_run_config, read_resolved
from varprune.engine.rundir import CHECKPOINT, CONFIG, WEIGHTS
from varprune.engine.runs import RunData, build_model, data_problems, load_data
from varprune.errors import RunError
from varprune.tasks import Task


def bnt_problems(batches: int, batch_size: int) -> list[str]:
    """The BN re-tuning settings' problems, naming the flags (every command that re-tunes checks them first)."""
    found = []
    if isinstance(batches, bool) or not isinstance(batches, int) or not 0 <= batches <= 100_000:
        found.append(f"--bnt-batches must be an integer in [0, 100000] (0 skips re-tuning), got {batches}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 2 <= batch_size <= 1 << 20:
        found.append(
            f"--bnt-batch-size must be an integer in [2, 1048576] (BatchNorm cannot normalise a batch "
            f"of one), got {batch_size}"
        )
    return found


def bnt_inputs(images: torch.Tensor, batches: int, batch_size: int, normalize) -> list[torch.Tensor]:
    """The re-tuning batches: the first ``batches * batch_size`` images given
    (unaugmented; the caller passes a deterministic subset), normalised."""
    n = min(len(images), batches * batch_size)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:  # a last batch of one image: BatchNorm cannot normalise it
        starts.pop()
    ends = starts[1:] + [n]
    return [normalize(images[a:b]) for a, b in zip(starts, ends)]


def run_label(cfg: TrainConfig) -> str:
    """A run's short name in tables and plots: its method, on AdamW prefixed so ("adamw", "adamw+var s=1"),
    with VAR's strength."""
    name = cfg.method
    if cfg.optimizer == "adamw":
        name = "adamw" if cfg.method == "sgd" else f"adamw+{cfg.method}"
    if "var" in cfg.method.split("+"):
        if cfg.var_strength is not None:
            return f"{name} s={cfg.var_strength:g}"
        return f"{name} λ={cfg.var_lambda:g}"
    return name


def check_runs(runs: list[Path], data_dir=None) -> tuple[list, list[str]]:
    """Every run folder's configuration, and every problem with them (nothing is loaded)."""
    configs: list[TrainConfig | None] = []  # None where the configuration could not be read
    found: list[str] = []
    for run in runs:
        try:
            cfg = load_run_config(run)
        except RunError as e:
            configs.append(None)
            found.append(str(e))
            continue
        configs.append(cfg)
        if not (run / WEIGHTS).is_file():
            if (run / CHECKPOINT).is_file():
                found.append(
                    f"{run} is still training or was interrupted (no {WEIGHTS} yet): wait for it, or "
                    f"`varprune train --resume {run}` if it stopped"
                )
            else:
                found.append(f"{run} has no {WEIGHTS}: training did not finish; `varprune train --resume {run}`")
        problem = run_tokenizer_problem(run, read_resolved(run))
        if problem:
            found.append(problem)
        if data_dir is not None:
            cfg.data_dir = data_dir
        found += [p for p in data_problems(cfg) if p not in found]
    return configs, found


@dataclass
class Trained:
    """A finished run, loaded: its configuration, model (final weights) and data; ``other_data``: what the text
    it is measured on is instead of its own (``--other-data``: engine/identity.check_same_data), else None."""

    run: Path
    cfg: TrainConfig
    model: nn.Module
    data: RunData
    device: torch.device
    amp: str
    other_data: dict | None = None

    @property
    def task(self) -> Task:
        return self.data.task

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())

    @property
    def is_text(self) -> bool:
        return self.data.tokenizer is not None

    def bnt(self, batches: int, batch_size: int, images: int | None = None) -> list[torch.Tensor]:
        """The protocol's re-tuning inputs: a fixed random subset of the training images (seed 0), ``batches``
        of ``batch_size`` (or ``images`` of them in batches of ``batch_size``, the last one smaller). Empty for a
        model without BatchNorm: there is nothing to re-tune."""
        if not self.has_batchnorm:
            return []
        loader = self.data.train_loader
        n = batches * batch_size if images is None else images
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(loader.num_examples, generator=g)[:n]
        return bnt_inputs(loader.take(pick)[0], -(-n // batch_size), batch_size, loader.normalize)

    def fixed_batches(self, examples: int, batch_size: int, seed: int = 0) -> list[tuple]:
        """``examples`` unaugmented training examples (a fixed random subset) as ``(input, target)`` batches:
        what the analysis measures the training loss on (Hessian, loss profile)."""
        if self.is_text:  # windows (or labelled examples) of the training split, as the task takes them
            return _text_batches(self.data.data, examples, batch_size, self.cfg.seq_len, seed, self.device)
        loader = self.data.train_loader
        g = torch.Generator().manual_seed(seed)
        images, labels = loader.take(torch.randperm(loader.num_examples, generator=g)[:examples])
        return [
            (loader.normalize(images[i : i + batch_size]), labels[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]

    def calibration(self, samples: int, seq_len: int | None = None, source: str | None = None) -> list:
        """Inputs for the calibrated pruners from the training split, or from ``source`` (``--calib-data``)
        (:meth:`RunData.calibration`); text windows of ``seq_len`` tokens, by default the run's --seq-len.
        Refused with one line, before anything is drawn, when they would not fit in memory (engine.memory)."""
        return self.data.calibration(samples, seq_len or self.cfg.seq_len, source, self.model)

    @property
    def train_examples(self) -> int:
        return self.data.train_loader.num_examples

    @property
    def test_examples(self) -> int:
        return self.data.test_loader.num_examples


def _text_batches(data, examples: int, batch_size: int, seq_len: int, seed: int, device) -> list[tuple]:
    """Fixed ``(x, target)`` batches of the training split: windows ``(x, x)`` for language modeling, labelled
    examples ``({"input_ids", "attention_mask"}, labels)`` for classification and instruction tuning."""
    from varprune.data import calibration_inputs

    g = torch.Generator().manual_seed(seed)
    if data.instructions:  # whole examples, each batch padded to its longest
        from varprune.data.instructtokens import instruction_batches

        return instruction_batches(data.instructions["train"], examples, batch_size, seed, device)
    if data.streams:
        windows = torch.cat(calibration_inputs(data, examples, seq_len, seed=seed)).to(device)
        return [(w, w) for w in windows.split(batch_size)]
    ex = data.examples["train"]
    rows = torch.randperm(len(ex), generator=g)[:examples].to(ex.labels.device)
    return [
        (
            {"input_ids": ex.input_ids[r].to(device), "attention_mask": ex.attention_mask(r).to(device)},
            ex.labels[r].to(device),
        )
        for r in rows.split(batch_size)
    ]


def load_trained(
    run: Path,
    cfg: TrainConfig | None = None,
    device="auto",
    data_cache: dict | None = None,
    other_data: bool | None = None,
) -> Trained:
    """Load a finished run's final weights and data (checked by :func:`check_runs` first); data that is not the
    run's is refused (engine/identity.py), other text accepted with ``other_data`` (None: the command has no
    ``--other-data``, and the refusal does not offer it)."""
    from varprune.storage.checkpoint import load_weights

    cfg = cfg or load_run_config(run)
    dev = resolve_device(device if device != "auto" else "auto")
    cfg.device = str(dev)
    from varprune.engine.rundir import TOKENIZER
    from varprune.storage.files import file_digest

    tokenizer = file_digest(run / TOKENIZER) if (run / TOKENIZER).is_file() else None
    key = (
        cfg.dataset,
        cfg.data_dir,
        cfg.image_size,
        cfg.limit_train,
        cfg.limit_test,
        cfg.channels_last,
        cfg.validation_fraction,
        cfg.seq_len,
        tokenizer,
    )  # every field that changes what load_data returns
    cache = data_cache if data_cache is not None else {}
    if key not in cache:
        cache[key] = load_data(cfg, dev, run=run)
    data = cache[key]
    recorded = read_resolved(run)
    where = cfg.data_dir if cfg.data_dir else None
    other = check_same_data(recorded, data, str(run), where, bool(other_data), offered=other_data is not None)
    model = build_model(dataclasses.replace(cfg, init=None), data.data.info, dev, tokenizer=data.tokenizer)
    load_weights(run / WEIGHTS, model, expect={"model": cfg.model, "dataset": cfg.dataset})
    return Trained(Path(run), cfg, model, data, dev, resolve_amp(cfg.amp, dev), other)


def ensure_run(cfg: TrainConfig, run: Path, log=print, progress: bool = True) -> str:
    """Reuse, resume or train the run ``cfg`` in ``run`` (study, demo); return which it did.

    A folder that holds a run of another configuration is an error, never replaced.
    """
    from varprune.engine import distributed
    from varprune.engine.loop import train

    def what() -> str:
        if (run / CONFIG).exists():
            if not load_run_config(run).same_run(cfg):
                raise RunError(f"{run} holds a run with another configuration; choose another --out or remove it")
            return "reused" if (run / WEIGHTS).exists() else "resumed"
        return "trained"

    found = distributed.from_main(what)  # under torchrun: rank 0's folder decides for every process
    if found == "reused":
        log(f"reusing finished run {run}")
        return "reused"
    if found == "resumed":
        log(f"resuming {run}")
        train(cfg, run, resume=True, log=log, progress=progress)
        return "resumed"
    log(f"training {run.name}: {cfg.model}, {run_label(cfg)}, {cfg.epochs} epochs")
    train(cfg, run, log=log, progress=progress)
    return "trained"
