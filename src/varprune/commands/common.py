"""What several commands share: flag types, the pruning-setting and BN re-tuning flags, and up-front checks.

Each check returns a list of one-line problems, so a command can report every problem at once before any work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.errors import UsageError

SWEEP_SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]


def sparsities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not 0 <= v < 1]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"sparsities must be in [0, 1), got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"sparsities must be unique, got {text!r}")
    return values


def names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def floats_arg(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def output_file(text: str | None, flag: str, overwrite: bool, kind: str) -> Path | None:
    """A file a command will write (``kind``: "png", "html"), checked before any work against the output rule
    (storage.files): never a run's file, never a file varprune did not write without --overwrite, never a
    folder, device, FIFO or link, and its folder must exist. A problem is one UsageError line."""
    from varprune.errors import RunError
    from varprune.storage.files import check_output_file, html_is_ours, png_is_ours

    if text is None:
        return None
    ours, suffixes = {"png": (png_is_ours, (".png",)), "html": (html_is_ours, (".html", ".htm"))}[kind]
    try:
        return check_output_file(text, flag, overwrite, ours=ours, suffixes=suffixes)
    except RunError as e:
        raise UsageError(str(e)) from None


def add_overwrite_flag(p, what: str) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} even if varprune did not write it (its own files are replaced anyway; "
        f"a run's files and anything that is not a regular file never are)",
    )


def add_other_data_flag(p) -> None:
    """``--other-data``, the one escape from the data check (engine/identity.py), for every command that reads a
    run's data again."""
    p.add_argument(
        "--other-data",
        action="store_true",
        help="accept a --data-dir whose text differs from the text the run was trained on (its recorded sha256 "
        "digests), to measure on it deliberately; the text's digests are printed and recorded in the output. "
        "Without it such a folder is refused. An edited or replaced tokenizer.json is refused either way",
    )


def device_problem(name: str) -> list[str]:
    from varprune.device import resolve_device
    from varprune.engine.config import _device_check

    msg = _device_check(name)
    if msg:
        return [msg]
    try:
        resolve_device(name)
    except ValueError as e:
        return [str(e)]
    return []


def mask_problems(args, run_config=None) -> list[str]:
    """export and finetune prune once: a sparsity (unstructured) or an N:M pattern, never both; the calibration
    flags of a calibrated pruner (checked by the sweep's own rules), and none given where no calibration happens
    (``run_config``: the run's configuration, for its task; None if it could not be read)."""
    from varprune.engine.checks import Scope
    from varprune.engine.sweep import calibration_problems

    found = []
    if (args.sparsity is None) == (args.pattern == "unstructured"):
        found.append("give --sparsity for unstructured pruning, or --pattern N:M (not both)")
    pruners = (args.pruner,)
    scope = Scope.of_config(run_config, pruners) if run_config is not None else Scope(pruners=pruners)
    found += calibration_flag_problems(args, scope)
    return found + calibration_problems(pruners, calib_samples(args), args.calib_seq_len, args.calib_data)


def calib_samples(args) -> int:
    """--calib-samples, or its default when not given (the flag's default is None, so that a --calib-samples
    given where no calibration happens is seen and refused)."""
    from varprune.engine.sweep import DEFAULT_CALIB_SAMPLES

    return DEFAULT_CALIB_SAMPLES if args.calib_samples is None else args.calib_samples


def calibration_flag_problems(args, scope) -> list[str]:
    """The calibration flags given where they do nothing: magnitude pruning, --calib-seq-len on an image run,
    --calib-data on a run that is no language model (engine.checks, the one rule)."""
    import dataclasses

    from varprune.engine.checks import flag_problems

    # --calib-seq-len and --calib-data with no calibrated pruner: engine.sweep.calibration_problems says it (the
    # API's check too); here what the runs' task adds
    task = dataclasses.replace(scope, pruners=None)
    return flag_problems({"--calib-samples": args.calib_samples}, scope) + flag_problems(
        {"--calib-seq-len": args.calib_seq_len, "--calib-data": args.calib_data}, task
    )


def bnt_problems(args) -> list[str]:
    from varprune.engine.trained import bnt_problems as problems

    return problems(args.bnt_batches, args.bnt_batch_size)


def half_replaced(runs) -> list[str]:
    """Runs an interrupted ``train --overwrite`` left half replaced: commands that only read runs refuse them,
    naming the command that mends them (they never restore or delete anything themselves)."""
    from varprune.engine.rundir import RunFolder

    return [p for p in (RunFolder(run).half_replaced_problem() for run in runs) if p]


def finished_line(out) -> str:
    """Train's and finetune's last line: what was written, what next, and that the checkpoint may go."""
    from varprune.engine.rundir import CHECKPOINT

    line = f"wrote {out}/model.safetensors; next: varprune prune {out}"
    checkpoint = Path(out) / CHECKPOINT
    if checkpoint.is_file():
        mib = checkpoint.stat().st_size / 2**20
        line += (
            f"\n{checkpoint} ({mib:,.1f} MiB: weights and optimizer state) is needed only by `varprune train "
            f"--resume`; delete it once the run is final (no other command reads it)"
        )
    return line


def say_on_main(text: str) -> None:
    from varprune.engine import distributed

    if distributed.is_main():
        print(text)


def meta_model(cfg, run=None):
    """The run's model on the meta device (shapes and names, no memory); a text run's sizes come from the
    tokenizer recorded in RUN/config.json."""
    import dataclasses
    from types import SimpleNamespace

    import torch

    from varprune.data import dataset_info
    from varprune.engine.runconfig import read_resolved
    from varprune.engine.runs import model_arguments
    from varprune.models import create_model

    info = dataset_info(cfg.dataset)
    resolved = read_resolved(run) if run is not None else {}
    info = dataclasses.replace(
        info,
        channels=info.channels or 1,
        num_classes=resolved.get("num_classes") or info.num_classes or 2,
        size=info.size or 32,
    )
    tok = resolved.get("tokenizer")
    tokenizer = (
        SimpleNamespace(vocab_size=tok["vocab_size"], pad_id=tok.get("pad_id"))
        if isinstance(tok, dict)
        else (
            SimpleNamespace(vocab_size=cfg.vocab_size, pad_id=0)
            if info.task in ("language-modeling", "text-classification", "instruction-tuning")
            else None
        )
    )
    args, kwargs = model_arguments(cfg, info, tokenizer)
    with torch.device("meta"):
        return create_model(cfg.model, *args, **kwargs)


def epilog() -> str:
    from varprune.engine.methods import method_help
    from varprune.models import describe_models

    models = "\n".join(f"  {k:<14} {v}" for k, v in describe_models().items())
    return f"methods:\n{method_help()}\n\nmodels:\n{models}"


def patterns(text: str) -> list[str]:
    from varprune.numerics.pruning import PruningError, parse_pattern

    out = []
    for v in names(text):
        try:
            n, m = parse_pattern(v)
        except PruningError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        out.append(f"{n}:{m}")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"patterns must be unique, got {text!r}")
    return out


def add_scope_flag(p) -> None:
    from varprune.numerics.pruning import SCOPES

    p.add_argument(
        "--scope",
        choices=SCOPES,
        default=None,
        help="magnitude pruning's scope: global ranks all prunable weights together (CrAM's protocol); layerwise "
        "prunes the same fraction from every tensor (the LLM references' convention). Default: layerwise for "
        "causal language models, global otherwise; prune.json and the tables say which was used",
    )


def add_bnt_flags(p) -> None:
    p.add_argument(
        "--bnt-batches",
        type=int,
        default=20,
        help="BN re-tuning batches (default 20 of 500 = 10,000 training images, the reference "
        "measurement's protocol; CrAM re-tunes on 100 batches of 128 = 12,800); 0 skips "
        "re-tuning",
    )
    p.add_argument("--bnt-batch-size", type=int, default=500, help="BN re-tuning batch size (default 500)")


def add_calibration_flags(p) -> None:
    p.add_argument(
        "--calib-samples",
        type=int,
        help="Wanda and SparseGPT: calibration inputs drawn with a fixed seed from the training split "
        "(windows of tokens, or images), never the test split (default 128, the references')",
    )
    p.add_argument(
        "--calib-seq-len",
        type=int,
        help="Wanda and SparseGPT on text: tokens per calibration window (default: the run's --seq-len)",
    )
    p.add_argument(
        "--calib-data",
        metavar="FILE",
        help="Wanda and SparseGPT on a language model: draw the calibration windows from this local file "
        "instead of the training split: UTF-8 text (.txt, windows of its whole token stream) or JSON lines with "
        "a 'text' field (.jsonl, e.g. an unpacked C4 shard, the literature's calibration set: as the references "
        "draw it, one window from one random document longer than the window); tokenized with the run's tokenizer",
    )


def add_mask_flags(p) -> None:
    """One pruning setting (export, finetune): --sparsity or --pattern, --scope, and the pruner."""
    p.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4")
    add_scope_flag(p)
    p.add_argument(
        "--pruner",
        default="magnitude",
        choices=("magnitude", "wanda", "sparsegpt"),
        help="magnitude (default: global or layer-wise by --scope), or a calibrated one-shot pruner: "
        "wanda (|W| x ||X||, per output row) or sparsegpt (OBS updates from calibration inputs)",
    )
    add_calibration_flags(p)


def sweep_spec(args, pruners=None):
    """The SweepSpec of a command's sweep flags (engine/sweep.py); its problems are checked by the caller."""
    from varprune.engine.sweep import SweepSpec

    return SweepSpec(
        sparsities=tuple(args.sparsities),
        patterns=tuple(args.patterns),
        pruners=tuple(pruners if pruners is not None else names(args.pruners)),
        scope=args.scope,
        exclude=tuple(names(getattr(args, "exclude", None) or "")),
        bnt_batches=args.bnt_batches,
        bnt_batch_size=args.bnt_batch_size,
        calib_samples=calib_samples(args),
        calib_seq_len=args.calib_seq_len,
        calib_data=args.calib_data,
        choices=tuple(names(getattr(args, "choices", None) or "")),
    )


def add_sweep_flags(p) -> None:
    p.add_argument(
        "--sparsities",
        type=sparsities,
        default=SWEEP_SPARSITIES,
        help="comma-separated sparsities in [0, 1) (default 0.5,...,0.99)",
    )
    p.add_argument(
        "--patterns",
        type=patterns,
        default=[],
        help="comma-separated N:M semi-structured patterns swept beside the sparsities, e.g. 2:4,1:4,1:8 "
        "(N largest of every M consecutive weights along the input dimension; tensors whose input "
        "size is not a multiple of M stay dense)",
    )
    add_scope_flag(p)
    add_bnt_flags(p)
    p.add_argument(
        "--pruners",
        default="magnitude",
        help="comma-separated one-shot pruners, each swept over every setting: magnitude (default), "
        "wanda, sparsegpt (the calibrated pruners of the LLM literature; work on image models too)",
    )
    add_calibration_flags(p)
    add_choices_flag(p, "measured on the dense model and at every setting, beside the test metric")


def add_folder_flags(p, what: str, data: bool = True) -> None:
    """``--model hf:DIR`` and the data it is measured on, for the commands that take a model folder without a
    run (prune, export, finetune; evaluate takes hf:DIR as its FILE). ``what``: what the command does with it;
    ``data``: add the data flags (finetune has its own, the training flags)."""
    g = p.add_argument_group("a model folder without a run (engine/pretrained.py)")
    g.add_argument(
        "--model",
        metavar="hf:DIR",
        help=f"{what} a local Hugging Face model folder (config.json, model.safetensors, tokenizer.json) as it is, "
        "instead of a RUN: needs --dataset; the folder's tokenizer is used",
    )
    if data:
        add_folder_data_flags(g)
    else:
        g.add_argument("--dataset", help="with --model hf:DIR: the text dataset to fine-tune it on")


def add_folder_data_flags(g, batch: bool = True) -> None:
    """The data flags of a model folder; ``batch``: also --batch-size (evaluate's is its --commonsense's)."""
    g.add_argument("--dataset", help="with --model hf:DIR (or evaluate hf:DIR): the text dataset to measure it on")
    g.add_argument(
        "--seq-len",
        type=int,
        help="with hf:DIR: tokens per window (language modeling) or per example (default 128, as text runs)",
    )
    g.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="with hf:DIR: how the weights are held (default fp32); the calibrated pruners' statistics are fp32",
    )
    if batch:
        g.add_argument(
            "--batch-size",
            dest="eval_batch_size",
            type=int,
            default=8,
            help="with hf:DIR: windows (or examples) per evaluation batch (default 8)",
        )
    g.add_argument(
        "--limit-test",
        type=int,
        help="with hf:DIR: measure on a fixed subset of N test windows (or examples)",
    )


def folder_problems(args, run_given: bool, command: str) -> list[str]:
    """The refusals of --model hf:DIR before anything is read: with a RUN, without --dataset, not hf:DIR."""
    model = getattr(args, "model", None)
    given = "--model " if command != "evaluate" else ""  # evaluate takes hf:DIR in place of its FILE
    if model is None:
        # finetune's --seq-len is also a training flag of a RUN: the one rule over settings (engine.checks) says
        # where it does nothing
        seq_len = getattr(args, "seq_len", None) if command != "finetune" else None
        used = [f for f, v in (("--dataset", args.dataset), ("--seq-len", seq_len)) if v is not None]
        return [f"{', '.join(used)} applies to a model folder: give {given}hf:DIR (a RUN keeps its own)"] * bool(used)
    found = []
    if not model.startswith("hf:"):
        found.append(f"--model {model}: give a local Hugging Face model folder as hf:DIR")
    if run_given:
        found.append(f"give a RUN or --model {model}, not both: `varprune {command} --model {model} --dataset D ...`")
    if args.dataset is None:
        found.append(f"{given}{model} needs --dataset (the text dataset to measure it on) and usually --data-dir")
    for flag, key, low in (("--seq-len", "seq_len", 2), ("--batch-size", "eval_batch_size", 1),
                           ("--limit-test", "limit_test", 1)):  # fmt: skip
        value = getattr(args, key, None)
        if value is not None and not low <= value <= 1 << 20:
            found.append(f"{flag} must be an integer in [{low}, 1048576], got {value}")
    return found


def folder_config(args, keep_head: bool = True):
    """The configuration a folder given by the flags is measured under (engine.pretrained)."""
    from varprune.engine.pretrained import EVAL_BATCH, pretrained_config

    return pretrained_config(
        args.model,
        args.dataset,
        args.data_dir,
        args.seq_len,
        args.dtype,
        args.device,
        getattr(args, "eval_batch_size", EVAL_BATCH),
        args.limit_test,
        keep_head=keep_head,
    )


def add_choices_flag(p, when: str) -> None:
    """``--choices FILE[,FILE...]``: multiple-choice tasks scored as lm-eval-harness scores them."""
    p.add_argument(
        "--choices",
        metavar="FILE[,FILE...]",
        help="language models: comma-separated JSON-lines files of multiple-choice questions "
        '({"context": str, "choices": [str, ...], "label": int} a line; `varprune choices convert` makes them '
        "from BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC, OpenBookQA) or fortunes-endings (built offline "
        "from the fortunes test split): acc and acc_norm as lm-eval-harness scores them, per task and their "
        f"mean, {when}",
    )
