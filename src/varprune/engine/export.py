"""Pruned models people can ship: ``varprune export`` and ``varprune evaluate``.

``export_run`` prunes a run's final weights exactly as the sweep does (the same
masks from the same weights, the same BN re-tuning inputs), and writes one
compressed safetensors file (sparse_format.py: packed bit masks and kept
values, everything else as is). The file's metadata holds what is needed to
rebuild and check the model: the model name and constructor arguments, the
dataset's shape and classes, the pattern, the realised sparsity, the run's
configuration, and the metric the sweep protocol measured after BN re-tuning.

``evaluate_file`` loads such a file (:func:`varprune.load_pruned`) and
measures its task's metrics on the run's test split: the same number as
prune.json's ``<metric>_bnt`` at that sparsity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from varprune.device import autocast
from varprune.engine.config import TrainConfig
from varprune.engine.rundir import WEIGHTS
from varprune.engine.sweep import check_runs, load_trained
from varprune.errors import RunError
from varprune.numerics.pruning import apply_masks_, pattern_masks, recalibrate_bn
from varprune.storage.files import check_output_file, file_digest
from varprune.storage.pruned_format import load_pruned, pruned_is_ours, read_pruned_metadata, save_pruned


def export_run(
    run: Path,
    out: Path,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    scope: str = "global",
    exclude=(),
    values: str = "fp32",
    bnt_batches: int = 20,
    bnt_batch_size: int = 500,
    device: str = "auto",
    data_dir: str | None = None,
    log=print,
    overwrite: bool = False,
) -> dict:
    """Prune ``run`` one-shot, re-tune BN, measure, and write ``out``; return the file's metadata.

    ``out`` follows the output rule (storage.files): never a run's own file, never a file varprune did not
    write unless ``overwrite``, never a folder, device, FIFO or link.
    """
    configs, found = check_runs([run], data_dir)
    try:
        check_output_file(out, "--out", overwrite, ours=pruned_is_ours)
    except RunError as e:
        found.append(str(e))
    if found:
        raise RunError("; ".join(found))
    t = load_trained(run, configs[0], device)
    info = t.data.data.info
    model = t.model
    masks, skipped = pattern_masks(model, sparsity, pattern, scope, exclude)
    apply_masks_(model.named_parameters(), masks)
    bnt = t.bnt(bnt_batches, bnt_batch_size)
    if bnt:
        with autocast(bnt[0].device, t.amp):
            recalibrate_bn(model, bnt)
    metrics = t.task.evaluate(model, t.data.test_loader, t.amp)
    cfg = t.cfg.to_dict()
    meta = {
        "model": t.cfg.model,
        "model_args": {
            "in_channels": info.channels,
            "num_classes": info.num_classes,
            "image_size": info.size,
            **t.cfg.model_args,
        },
        "dataset": {
            "name": t.cfg.dataset,
            "task": info.task,
            "shape": [info.channels, info.size, info.size],
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
        },
        "pattern": pattern if pattern != "unstructured" else f"unstructured {scope} {sparsity:g}",
        "sparsity": json.dumps(sparsity),
        "scope": scope,
        "exclude": json.dumps(list(exclude)),
        "dense_skipped": json.dumps(skipped),
        "bnt": json.dumps({"batches": bnt_batches, "batch_size": bnt_batch_size}),
        "metric": t.task.primary,
        "metric_value": json.dumps(metrics[t.task.primary]),
        "train_config": json.dumps(cfg, sort_keys=True),
        "source_run": str(run),
        "source_weights_sha256": file_digest(run / WEIGHTS),
    }
    save_pruned(out, model.cpu(), {n: m.cpu() for n, m in masks.items()}, meta, values=values)
    log(
        f"wrote {out} ({out.stat().st_size:,} bytes; model.safetensors is "
        f"{(run / WEIGHTS).stat().st_size:,}): {t.task.primary} {100 * metrics[t.task.primary]:.2f}% "
        f"after BN re-tuning"
    )
    return read_pruned_metadata(out)


def evaluate_file(path: Path, data_dir: str | None = None, device: str = "auto") -> dict:
    """Load an exported model and measure it on its run's test split; returns the task's metrics."""
    from varprune.device import resolve_amp, resolve_device
    from varprune.engine.runs import check_same_data, load_data

    meta = read_pruned_metadata(path)
    try:
        cfg = TrainConfig.from_dict(json.loads(meta["train_config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise RunError(
            f"{path} holds no readable training configuration ({type(e).__name__}); was it written by "
            f"`varprune export`?"
        ) from None
    if data_dir is not None:
        cfg.data_dir = data_dir
    dev = resolve_device(device)
    cfg.device = str(dev)
    data = load_data(cfg, dev)
    recorded = meta.get("dataset")
    if isinstance(recorded, dict):
        check_same_data(
            {
                "task": recorded.get("task"),
                "input_shape": recorded.get("shape"),
                "num_classes": recorded.get("num_classes"),
                "class_names": recorded.get("class_names"),
            },
            data.data.info,
            str(path),
            data_dir,
        )
    model = load_pruned(path, dev)
    if cfg.channels_last:  # the memory format the sweep evaluated in: the same arithmetic
        model = model.to(memory_format=torch.channels_last)
    return data.task.evaluate(model, data.test_loader, resolve_amp(cfg.amp, dev)) | {"metric": data.task.primary}
