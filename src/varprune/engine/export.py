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
from dataclasses import dataclass
from pathlib import Path

import torch

from varprune.device import autocast
from varprune.engine.config import TrainConfig
from varprune.engine.identity import other_data_line
from varprune.engine.rundir import WEIGHTS
from varprune.engine.runs import model_arguments
from varprune.engine.sweep import default_scope
from varprune.engine.trained import Trained, check_runs, load_trained
from varprune.errors import RunError
from varprune.numerics.pruners import prune_once
from varprune.numerics.pruning import recalibrate_bn
from varprune.report.tables import metric_info
from varprune.storage.files import check_output_file, file_digest
from varprune.storage.pruned_format import load_pruned, pruned_is_ours, read_pruned_metadata, save_pruned


def export_run(
    run: Path,
    out: Path,
    sparsity: float | None = None,
    pattern: str = "unstructured",
    scope: str | None = None,
    exclude=(),
    values: str = "fp32",
    bnt_batches: int = 20,
    bnt_batch_size: int = 500,
    device: str = "auto",
    data_dir: str | None = None,
    log=print,
    overwrite: bool = False,
    pruner: str = "magnitude",
    calib_samples: int = 128,
    calib_seq_len: int | None = None,
    calib_data: str | None = None,
    format: str = "varprune",
    other_data: bool = False,
    evaluate: bool = True,
) -> dict:
    """Prune ``run`` one-shot, re-tune BN, measure (unless not ``evaluate``), and write ``out``; return the file's
    metadata. ``other_data`` (``--other-data``): measure on text other than the run's, recorded in the metadata
    (``other_data``); without it such a ``data_dir`` is refused (engine/identity.py).

    ``out`` follows the output rule (storage.files): never a run's own file, never a file varprune did not
    write unless ``overwrite``, never a folder, device, FIFO or link.
    """
    configs, found = check_runs([run], data_dir)
    found += output_problems(out, format, overwrite, configs[0].model if configs[0] is not None else None)
    if found:
        raise RunError("; ".join(found))
    t = load_trained(run, configs[0], device, other_data=other_data)
    if t.other_data is not None:
        log(other_data_line(str(run), t.other_data))
    source = {
        "source_run": str(run),
        "source_weights_sha256": file_digest(run / WEIGHTS),
        **({"other_data": json.dumps(t.other_data, sort_keys=True)} if t.other_data is not None else {}),
    }
    mask = Mask(sparsity, pattern, scope, tuple(exclude), pruner, calib_samples, calib_seq_len, calib_data)
    return export_loaded(
        t,
        out,
        source,
        mask,
        values,
        bnt_batches,
        bnt_batch_size,
        format,
        evaluate,
        log,
        _trained_on(run, t),
        run / WEIGHTS,
    )


def output_problems(out: Path, format: str, overwrite: bool, model: str | None) -> list[str]:
    """Where export may write ``out`` in ``format`` (``model``: the source's --model, None if unknown)."""
    found = []
    if format not in ("varprune", "hf"):
        found.append(f"--format {format}: choose varprune (compressed, one file) or hf (a Hugging Face model folder)")
    elif format == "hf":
        from varprune.storage.files import non_regular

        if model is not None and model not in ("gpt2", "llama", "bert") and not model.startswith("hf:"):
            found.append(
                f"--format hf writes a Hugging Face model folder: {model} is not a transformers "
                f"model (gpt2, llama, bert, hf:DIR); use the default --format varprune"
            )
        if Path(out).exists() or non_regular(out):
            found.append(
                f"--out {out} exists; varprune writes a Hugging Face model folder only where there is none: "
                f"remove it or choose another"
            )
        elif not Path(out).parent.is_dir():
            found.append(f"--out {out}: folder {Path(out).parent} does not exist; create it first")
    else:
        try:
            check_output_file(out, "--out", overwrite, ours=pruned_is_ours)
        except RunError as e:
            found.append(str(e))
    return found


@dataclass(frozen=True)
class Mask:
    """One pruning setting of export: what the mask is made by and from."""

    sparsity: float | None = None
    pattern: str = "unstructured"
    scope: str | None = None  # None: magnitude's default for the model's task (engine.sweep.default_scope)
    exclude: tuple[str, ...] = ()
    pruner: str = "magnitude"
    calib_samples: int = 128
    calib_seq_len: int | None = None
    calib_data: str | None = None


def export_loaded(
    t: Trained,
    out: Path,
    source: dict,
    mask: Mask,
    values: str = "fp32",
    bnt_batches: int = 20,
    bnt_batch_size: int = 500,
    format: str = "varprune",
    evaluate: bool = True,
    log=print,
    trained_on: dict | None = None,
    dense: Path | None = None,
) -> dict:
    """Prune the loaded model ``t`` (a run's final weights, or a model folder as it is: engine.pretrained) at
    ``mask`` as the sweep does (the same calibration draw), re-tune BN, measure unless not ``evaluate``, and write
    ``out`` (checked by the caller). ``source``: string metadata naming where the weights came from;
    ``trained_on``: the text digests for the metadata's ``dataset``; ``dense``: the dense weights' file, whose size
    the log compares."""
    info = t.data.data.info
    model = t.model
    calibration = (
        t.calibration(mask.calib_samples, mask.calib_seq_len, mask.calib_data) if mask.pruner != "magnitude" else None
    )
    setting = mask.pattern if mask.pattern != "unstructured" else mask.sparsity
    if setting is None:
        raise RunError("unstructured pruning needs a sparsity (--sparsity)")
    scope = mask.scope or default_scope(info.task)
    masks, skipped, fallback = prune_once(model, mask.pruner, setting, scope, mask.exclude, calibration)
    bnt = t.bnt(bnt_batches, bnt_batch_size)
    if bnt:
        with autocast(bnt[0].device, t.amp):
            recalibrate_bn(model, bnt)
    shown = metric_info(t.task.primary)
    value = None
    if evaluate:
        what = "windows" if info.task == "language-modeling" else "examples"
        log(f"measuring the pruned model on the test split ({t.test_examples} {what}; --no-eval skips this)")
        value = t.task.evaluate(model, t.data.test_loader, t.amp)[t.task.primary]
        measured = f"{t.task.primary} {shown.fmt(value)}{'%' if shown.percent else ''}" + (
            " after BN re-tuning" if bnt else ""
        )
    else:
        measured = "not measured (--no-eval)"
    args, kwargs = model_arguments(t.cfg, info, t.data.tokenizer)
    sparsity = mask.sparsity
    meta = {
        "model": t.cfg.model,
        "model_args": {"in_channels": args[0], "num_classes": args[1], "image_size": args[2], **kwargs},
        "dataset": {
            "name": t.cfg.dataset,
            "task": info.task,
            "shape": [info.channels, info.size, info.size],
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            **(trained_on or {}),
        },
        "pattern": mask.pattern if mask.pattern != "unstructured" else f"unstructured {scope} {sparsity:g}",
        "pruner": mask.pruner,
        "dense_fallback": json.dumps(fallback),
        "sparsity": json.dumps(sparsity),
        "scope": scope,
        "exclude": json.dumps(list(mask.exclude)),
        "dense_skipped": json.dumps(skipped),
        "bnt": json.dumps({"batches": bnt_batches, "batch_size": bnt_batch_size}),
        "metric": t.task.primary,
        "metric_value": json.dumps(value),
        "train_config": json.dumps(t.cfg.to_dict(), sort_keys=True),
        **source,
    }
    if mask.pruner != "magnitude":  # the calibration inputs, as prune.json records them
        meta["calibration"] = json.dumps(
            {"samples": mask.calib_samples, "seq_len": mask.calib_seq_len, "data": mask.calib_data}
        )
    if t.data.tokenizer is not None:  # a text model's file carries its tokenizer: evaluate needs nothing else
        meta["tokenizer_json"] = t.data.tokenizer.to_json()
        meta["tokenizer_pad_id"] = json.dumps(t.data.tokenizer.pad_id)
    if format == "hf":  # pruned weights as zeros in a folder that transformers, lm-eval and vLLM load
        from varprune.storage.hf_folder import read_hf_metadata, save_hf_folder

        strings = {
            k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in meta.items()
            if k not in ("tokenizer_json", "tokenizer_pad_id")
        }
        tokenizer = t.data.tokenizer.to_json() if t.data.tokenizer else None
        if tokenizer is not None and info.task in ("language-modeling", "instruction-tuning"):
            # a causal LM's text is encoded without special tokens (the perplexity protocol): the folder's
            # tokenizer must not add the classifier's <cls> when lm-eval or vLLM encode with it
            doc = json.loads(tokenizer)
            doc["post_processor"] = None
            tokenizer = json.dumps(doc)
        config = getattr(model, "config", None)
        if config is not None and info.task == "text-classification" and len(info.class_names) == config.num_labels:
            # the labels by name (not transformers' LABEL_k): a pipeline or a reader of config.json sees the topics
            config.id2label = dict(enumerate(info.class_names))
            config.label2id = {name: i for i, name in enumerate(info.class_names)}
        save_hf_folder(
            model.cpu(),
            out,
            tokenizer_json=tokenizer,
            metadata={"varprune_" + k: v for k, v in strings.items()},
            values=values,
        )
        kind = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[values]
        rounded = f" (measured in float32, before the weights were rounded to {kind})" if values != "fp32" else ""
        log(f"wrote the Hugging Face model folder {out} ({kind} weights): {measured}{rounded * evaluate}")
        log(_context_note(model, t.cfg))
        return read_hf_metadata(out)
    save_pruned(out, model.cpu(), {n: m.cpu() for n, m in masks.items()}, meta, values=values)
    size = out.stat().st_size
    if dense is not None and dense.is_file():
        log(f"wrote {out} ({size:,} bytes; {dense.name} is {dense.stat().st_size:,}): {measured}")
        if size >= dense.stat().st_size:
            log(_larger_note(out, size, dense.stat().st_size))
    else:
        log(f"wrote {out} ({size:,} bytes): {measured}")
    return read_pruned_metadata(out)


def _trained_on(run: Path, t) -> dict:
    """The digests of the text ``run`` was trained on, for an export's ``dataset`` (evaluate checks its
    --data-dir against them): as the run recorded them, or for a run of older varprune the text read now
    when it is not ``--other-data``."""
    from varprune.engine.runconfig import read_resolved

    texts = read_resolved(run).get("text_sha256")
    if not isinstance(texts, dict) and t.other_data is None:
        texts = getattr(t.data.data, "digests", None)
    return {"text_sha256": dict(texts)} if texts else {}


def _context_note(model, cfg: TrainConfig) -> str:
    """What the exported folder's context is: its config's positions (a model folder's own, or the sequence
    length a model built from scratch was given), beside the windows it was trained on."""
    config = model.config
    positions = next(
        (
            getattr(config, k)
            for k in ("n_positions", "max_position_embeddings")
            if isinstance(getattr(config, k, None), int)
        ),
        None,
    )
    if positions is None:
        return f"context: varprune ran it on windows of {cfg.seq_len} tokens"
    note = (
        f"context: {positions} positions (config.json; model_max_length in tokenizer_config.json); "
        f"varprune ran it on windows of {cfg.seq_len} tokens"
    )
    if positions == cfg.seq_len and cfg.model == "gpt2":
        note += (
            f"; GPT-2 has one learned row per position, so generate() takes at most {positions} tokens, prompt "
            f"included: train with --model-arg n_positions=N for a longer context"
        )
    return note


def _larger_note(out: Path, size: int, dense: int) -> str:
    """Why a compressed export came out no smaller than the dense weights: what its header (metadata) holds, and
    what the masks cost."""
    with open(out, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return (
        f"note: {out.name} is not smaller than the dense model.safetensors ({size:,} against {dense:,} bytes): "
        f"{header:,} bytes of it are metadata (the run's configuration, a text model's tokenizer), and each prunable "
        f"weight costs a mask bit, so few pruned weights save little; it pays at high sparsity or with "
        f"--values fp16 or bf16"
    )


def evaluate_file(path: Path, data_dir: str | None = None, device: str = "auto", other_data: bool = False) -> dict:
    """Load an exported model and measure it on its run's test split; returns the task's metrics (with
    ``other_data``, measured on other text: returned under ``other_data``, engine/identity.py)."""
    from varprune.device import resolve_amp, resolve_device
    from varprune.engine.identity import check_same_data
    from varprune.engine.runs import load_data

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
    tokenizer = None
    if "tokenizer_json" in meta:
        from varprune.data.tokenizer import tokenizer_from_json

        tokenizer = tokenizer_from_json(
            meta["tokenizer_json"], json.loads(meta.get("tokenizer_pad_id", "null")), str(path)
        )
    data = load_data(cfg, dev, tokenizer=tokenizer)
    recorded = meta.get("dataset")
    other = None
    if isinstance(recorded, dict):
        other = check_same_data(
            {
                "task": recorded.get("task"),
                "input_shape": recorded.get("shape"),
                "num_classes": recorded.get("num_classes"),
                "class_names": recorded.get("class_names"),
                "text_sha256": recorded.get("text_sha256"),
            },
            data,
            str(path),
            data_dir,
            other_data,
        )
    model = load_pruned(path, dev)
    if cfg.channels_last:  # the memory format the sweep evaluated in: the same arithmetic
        model = model.to(memory_format=torch.channels_last)
    metrics = data.task.evaluate(model, data.test_loader, resolve_amp(cfg.amp, dev)) | {"metric": data.task.primary}
    return metrics | ({"other_data": other} if other is not None else {})
