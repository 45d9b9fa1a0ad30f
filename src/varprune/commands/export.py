"""``varprune export``: prune a run one-shot and write a compressed, shippable model file."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="prune a run one-shot and write a compressed, shippable model file",
        description="Prune RUN's final weights exactly as `varprune prune` does, re-tune BatchNorm, "
        "and write one compressed safetensors file (packed bit masks + kept values; "
        "load it with varprune.load_pruned). No pickle. With --model hf:DIR --dataset D instead of RUN: "
        "a Hugging Face model folder as it is, pruned from the same calibration windows as "
        "`varprune prune --model hf:DIR` draws.",
    )
    p.add_argument("run", metavar="RUN", nargs="?")
    p.add_argument(
        "--out", required=True, help="the file to write (.safetensors), or with --format hf the model folder to create"
    )
    p.add_argument(
        "--format",
        choices=("varprune", "hf"),
        default="varprune",
        help="varprune: one compressed file (bit masks + kept values; varprune.load_pruned); hf: a "
        "Hugging Face model folder with the pruned weights as zeros and the tokenizer, which "
        "AutoModelForCausalLM.from_pretrained, lm-eval-harness or vLLM load (transformers models)",
    )
    c.add_mask_flags(p)
    p.add_argument("--exclude", help="comma-separated parameter names or patterns not to prune")
    p.add_argument(
        "--values",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="dtype of the kept values (fp32: bit for bit the evaluated weights)",
    )
    c.add_bnt_flags(p)
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    c.add_other_data_flag(p)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="write the file without measuring the pruned model on the test split first (by default it is "
        "measured, and the metric recorded in the file)",
    )
    c.add_folder_flags(p, "export")
    c.add_overwrite_flag(p, "the --out file")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.engine.export import Mask, export_run

    run_given = args.run is not None
    found = c.folder_problems(args, run_given, "export")
    if not run_given and args.model is None:
        found.append("give a RUN, or --model hf:DIR --dataset D")
    if found:
        raise UsageError("; ".join(found))
    folder = args.model is not None
    found = [] if folder else c.half_replaced([Path(args.run)])
    if found:
        raise UsageError("; ".join(found))
    config = c.folder_config(args) if folder else _run_config(Path(args.run))
    found = c.mask_problems(args, config) + c.bnt_problems(args) + c.device_problem(args.device)
    if folder and args.other_data:
        found.append("--other-data applies to a RUN: a model folder is measured on the --dataset given")
    if found:
        raise UsageError("; ".join(found))
    if folder:
        from varprune.engine.pretrained import export_pretrained

        mask = Mask(
            args.sparsity,
            args.pattern,
            args.scope,
            tuple(c.names(args.exclude or "")),
            args.pruner,
            c.calib_samples(args),
            args.calib_seq_len,
            args.calib_data,
        )
        export_pretrained(config, Path(args.out), mask, args.values, args.format, not args.no_eval, args.overwrite)
        return 0
    export_run(
        Path(args.run),
        Path(args.out),
        args.sparsity,
        args.pattern,
        args.scope,
        c.names(args.exclude or ""),
        args.values,
        args.bnt_batches,
        args.bnt_batch_size,
        args.device,
        args.data_dir,
        overwrite=args.overwrite,
        pruner=args.pruner,
        calib_samples=c.calib_samples(args),
        calib_seq_len=args.calib_seq_len,
        calib_data=args.calib_data,
        format=args.format,
        other_data=args.other_data,
        evaluate=not args.no_eval,
    )
    return 0


def _run_config(run: Path):
    """RUN's configuration for the checks of the flags (its task), or None when it cannot be read: export_run
    reports that in its own words."""
    from varprune.engine.runconfig import load_run_config
    from varprune.errors import RunError

    try:
        return load_run_config(run)
    except (RunError, OSError, ValueError):
        return None
