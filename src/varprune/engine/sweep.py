"""The pruning sweep: prune one-shot -> BN re-tune -> evaluate, over sparsities, for trained runs.

Used by ``varprune prune``, ``study`` and ``demo``. A sweep writes
RUN/prune.{json,csv,png} only; a run's weights and checkpoint are read, never
modified.

prune.json: ``metric`` (the task's primary metric; absent in files of 0.1,
meaning accuracy), ``dense_<metric>``, and per sparsity ``sparsity``,
``realised_sparsity``, ``<metric>`` (before BN re-tuning) and ``<metric>_bnt``
(after), fractions in [0, 1]. Tasks with several metrics (segmentation) also
store all of them under ``dense_metrics``, ``metrics`` and ``metrics_bnt``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from varprune.device import autocast, resolve_amp, resolve_device
from varprune.engine.config import TrainConfig, load_run_config, read_resolved
from varprune.engine.rundir import CHECKPOINT, CONFIG, WEIGHTS
from varprune.engine.runs import build_model, check_same_data, data_fingerprint, data_problems, load_data
from varprune.errors import RunError
from varprune.numerics.pruning import (
    MagnitudePruner,
    apply_masks_,
    check_sparsity,
    pattern_masks,
    realised_sparsity,
    recalibrate_bn,
)
from varprune.report.results import write_sweep
from varprune.report.tables import setting_key
from varprune.storage.files import file_digest
from varprune.tasks import Task

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)


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


def prune_sweep(
    model: nn.Module,
    sparsities: Iterable[float],
    task: Task,
    test_loader,
    bnt: list[torch.Tensor],
    scope: str = "global",
    exclude: Iterable[str] = (),
    amp: str = "none",
    progress=None,
    patterns: Iterable[str] = (),
) -> dict:
    """Evaluate ``model`` pruned one-shot at every sparsity (and N:M pattern), before and after BN re-tuning.

    Unstructured settings share one sort of the magnitudes (MagnitudePruner);
    each N:M pattern keeps the N largest of every M consecutive weights along
    the input dimension, tensors whose input size is not a multiple of M left
    dense (listed under ``skipped``, counted as dense in ``realised_sparsity``).
    With no re-tuning batches (``bnt == []``) re-tuning is skipped and the
    "after" value equals the "before" one. The model is restored to its dense
    state afterwards. Returns the ``prune.json`` document.
    """
    sparsities = [check_sparsity(s) for s in sparsities]
    patterns = list(patterns)
    m = task.primary
    several = len(task.metric_names) > 1
    dense_state = copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    dense = task.evaluate(model, test_loader, amp)
    pruner = MagnitudePruner(model, scope, exclude) if sparsities else None  # one sort for every sparsity
    results, prune_time, bnt_time = [], 0.0, 0.0
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    settings = [("sparsity", s) for s in sparsities] + [("pattern", p) for p in patterns]
    try:
        for kind, value in settings:
            model.load_state_dict(dense_state)
            sync()
            t = time.perf_counter()
            skipped = []
            if kind == "sparsity":
                masks = pruner.apply(value)
            else:
                masks, skipped = pattern_masks(model, None, value, scope, exclude)
                apply_masks_(model.named_parameters(), masks)
            sync()
            prune_time += time.perf_counter() - t
            before = task.evaluate(model, test_loader, amp)
            if bnt:
                t = time.perf_counter()
                with autocast(bnt[0].device, amp):
                    recalibrate_bn(model, bnt)
                sync()
                bnt_time += time.perf_counter() - t
                after = task.evaluate(model, test_loader, amp)
            else:
                after = before
            realised = realised_sparsity(masks)
            row = (
                {"sparsity": value, "realised_sparsity": realised}
                if kind == "sparsity"
                else {"pattern": value, "sparsity": realised, "realised_sparsity": realised, "skipped": skipped}
            )
            row.update({m: before[m], f"{m}_bnt": after[m]})
            if several:
                row["metrics"], row["metrics_bnt"] = before, after
            results.append(row)
            if progress is not None:
                progress(value, before[m], after[m])
    finally:
        model.load_state_dict(dense_state)
    doc = {} if m == "accuracy" else {"metric": m}
    doc.update(
        {
            f"dense_{m}": dense[m],
            "scope": scope,
            "exclude": list(exclude),
            "results": results,
            "timing": {"total_s": time.perf_counter() - t0, "prune_s": prune_time, "bnt_s": bnt_time},
        }
    )
    if several:
        doc["dense_metrics"] = dense
    return doc


# ---------------------------------------------------------------- run folders


def run_label(cfg: TrainConfig) -> str:
    if "var" in cfg.method.split("+"):
        if cfg.var_strength is not None:
            return f"{cfg.method} s={cfg.var_strength:g}"
        return f"{cfg.method} λ={cfg.var_lambda:g}"
    return cfg.method


def check_runs(runs: list[Path], data_dir=None) -> tuple[list, list[str]]:
    """Every run folder's configuration, and every problem with them (nothing is loaded)."""
    configs, found = [], []
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
        if data_dir is not None:
            cfg.data_dir = data_dir
        found += [p for p in data_problems(cfg) if p not in found]
    return configs, found


def finished_sweep(
    run: Path, sparsities, scope, exclude, bnt_batches, bnt_batch_size, patterns=(), data: dict | None = None
) -> dict | None:
    """RUN/prune.json if it was made from RUN's current weights with exactly these settings, on the same data
    (``data``: :func:`~varprune.engine.runs.data_fingerprint`; None: the run's own), and its plot exists (a sweep
    interrupted between the two is redone)."""
    try:
        doc = json.loads((run / "prune.json").read_text())
        same = (
            [setting_key(r) for r in doc["results"]] == list(sparsities) + list(patterns)
            and doc["scope"] == scope
            and list(doc["exclude"]) == list(exclude)
            and doc["bnt_batches"] == bnt_batches
            and doc["bnt_batch_size"] == bnt_batch_size
            and doc["weights_sha256"] == file_digest(run / WEIGHTS)
            and doc.get("data") == (data if data is not None else data_fingerprint(load_run_config(run)))
            and (run / "prune.png").is_file()
            and (run / "prune.csv").is_file()
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError, AttributeError):
        return None
    return doc if same else None


@dataclass
class Trained:
    """A finished run, loaded: its configuration, model (final weights) and data."""

    run: Path
    cfg: TrainConfig
    model: nn.Module
    data: object  # loop.RunData
    device: torch.device
    amp: str

    @property
    def task(self) -> Task:
        return self.data.task

    def bnt(self, batches: int, batch_size: int, images: int | None = None) -> list[torch.Tensor]:
        """The protocol's re-tuning inputs: a fixed random subset of the training images (seed 0), ``batches``
        of ``batch_size`` (or ``images`` of them in batches of ``batch_size``, the last one smaller)."""
        pool = self.data.train_loader.images
        n = batches * batch_size if images is None else images
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(pool), generator=g)[:n]
        return bnt_inputs(pool[pick.to(pool.device)], -(-n // batch_size), batch_size, self.data.train_loader.normalize)

    def fixed_batches(self, examples: int, batch_size: int, seed: int = 0) -> list[tuple]:
        """``examples`` unaugmented training examples (a fixed random subset) as ``(input, target)`` batches:
        what the analysis measures the training loss on (Hessian, loss profile)."""
        loader = self.data.train_loader
        images, labels = loader.images, loader.labels
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(images), generator=g)[:examples].to(images.device)
        return [
            (loader.normalize(images[pick[i : i + batch_size]]), labels[pick[i : i + batch_size]])
            for i in range(0, len(pick), batch_size)
        ]

    @property
    def train_examples(self) -> int:
        return self.data.train_loader.num_examples

    @property
    def test_examples(self) -> int:
        return self.data.test_loader.num_examples


def load_trained(run: Path, cfg: TrainConfig | None = None, device="auto", data_cache: dict | None = None) -> Trained:
    """Load a finished run's final weights and data (checked by :func:`check_runs` first)."""
    from varprune.storage.checkpoint import load_weights

    cfg = cfg or load_run_config(run)
    dev = resolve_device(device if device != "auto" else "auto")
    cfg.device = str(dev)
    key = (
        cfg.dataset,
        cfg.data_dir,
        cfg.image_size,
        cfg.limit_train,
        cfg.limit_test,
        cfg.channels_last,
        cfg.validation_fraction,
    )  # every field that changes what load_data returns
    cache = data_cache if data_cache is not None else {}
    if key not in cache:
        cache[key] = load_data(cfg, dev)
    data = cache[key]
    recorded = read_resolved(run)
    if "num_classes" in recorded:  # runs of 0.1 recorded less: nothing to compare
        check_same_data(recorded, data.data.info, str(run), cfg.data_dir if cfg.data_dir else None)
    model = build_model(dataclasses.replace(cfg, init=None), data.data.info, dev)  # its own weights, not --init's
    load_weights(run / WEIGHTS, model, expect={"model": cfg.model, "dataset": cfg.dataset})
    return Trained(Path(run), cfg, model, data, dev, resolve_amp(cfg.amp, dev))


def prune_runs(
    runs: list[Path],
    sparsities,
    scope="global",
    exclude=(),
    bnt_batches=20,
    bnt_batch_size=500,
    data_dir=None,
    device="auto",
    log=print,
    reuse=False,
    patterns=(),
) -> list[tuple[str, dict]]:
    """Sweep every run; write RUN/prune.{json,csv,png}; return (label, document) pairs.

    ``reuse``: a run whose prune.json was made from its current weights with
    the same settings is not swept again (an interrupted sweep resumes).
    """
    dev = resolve_device(device)
    configs, found = check_runs(runs, data_dir)  # every folder checked before any work
    if found:
        raise RunError("; ".join(found))
    cache, out = {}, []
    labels = [run_label(c) for c in configs]
    if len(set(labels)) < len(labels):
        labels = [str(r) for r in runs]
    for run, cfg, label in zip(runs, configs, labels):
        fingerprint = data_fingerprint(cfg)  # check_runs set cfg.data_dir to --data-dir
        done = (
            finished_sweep(run, sparsities, scope, exclude, bnt_batches, bnt_batch_size, patterns, fingerprint)
            if reuse
            else None
        )
        if done is not None:
            log(f"reusing {run / 'prune.json'} (same weights and settings; --force sweeps again)")
            done["label"] = label
            out.append((label, done))
            continue
        digest = file_digest(run / WEIGHTS)
        t = load_trained(run, cfg, str(dev), cache)
        log(f"pruning {run} ({label})")
        m = t.task.primary
        doc = prune_sweep(
            t.model,
            sparsities,
            t.task,
            t.data.test_loader,
            t.bnt(bnt_batches, bnt_batch_size),
            scope,
            exclude,
            t.amp,
            progress=lambda s, a, b, m=m: log(
                f"  {s if isinstance(s, str) else f'{100 * s:g}%'}: {m} {100 * b:.2f}% with BNT, {100 * a:.2f}% without"
            ),
            patterns=patterns,
        )
        doc.update(
            {
                "run": str(run),
                "label": label,
                "bnt_batches": bnt_batches,
                "bnt_batch_size": bnt_batch_size,
                "weights_sha256": digest,
                "data": fingerprint,
            }
        )
        write_sweep(run, doc, label)
        out.append((label, doc))
    return out


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
    log(f"training {run.name}: {cfg.model}, {cfg.method}, {cfg.epochs} epochs")
    train(cfg, run, log=log, progress=progress)
    return "trained"
