"""``varprune finetune``: prune a run one-shot, then train with the mask fixed."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.commands.flags import add_flags
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune",
        help="prune a run one-shot, then train with the mask fixed",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prune RUN's final weights one-shot (the sweep's masks) and train them with the "
        "mask fixed: pruned weights, their gradients and optimizer state stay exactly "
        "zero. Model and data come from RUN; training flags default to RUN's, with a "
        "tenth of its learning rate and no warm-up. Resumable like train. With --model hf:DIR --dataset D "
        "instead of RUN: a Hugging Face model folder as it is, pruned and fine-tuned on D (training flags "
        "default as for train).",
        epilog=epilog,
    )
    p.add_argument("run", metavar="RUN", nargs="?")
    p.add_argument("--out", required=True, help="run folder to create")
    c.add_mask_flags(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    c.add_other_data_flag(p)
    add_flags(p, exclude=("dataset", "model", "model_args", "init", "init_exclude", "image_size", "download"))
    c.add_folder_flags(p, "prune and fine-tune", data=False)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import dataclasses

    from varprune.engine.loop import train
    from varprune.engine.runconfig import load_run_config, read_resolved

    found = c.folder_problems(args, args.run is not None, "finetune")
    if args.run is None and args.model is None:
        found.append("give a RUN, or --model hf:DIR --dataset D")
    if found:
        raise UsageError("; ".join(found))
    if args.model is not None:
        return _finetune_folder(args)
    source = Path(args.run)
    found = c.half_replaced([source])
    if found:
        raise UsageError("; ".join(found))
    base = load_run_config(source)
    found = c.mask_problems(args, base)
    if found:
        raise UsageError(found[0])
    given = _given(args)
    # model and data come from RUN; training flags that are not given start from RUN's, with a
    # fine-tuning schedule: a tenth of its learning rate and no warm-up
    assert base.lr is not None  # TrainConfig.__post_init__ resolves the default learning rate
    defaults: dict[str, float | None] = {"lr": base.lr / 10, "warmup_epochs": 0.0}
    if "var_strength" not in given and base.var_strength is not None:
        # RUN's strength was relative to psi at ITS initial weights: keep the lambda it resolved to (not
        # s / psi(pruned trained weights), another lambda), unless --var-lambda is given
        lam = read_resolved(source).get("var_lambda")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):  # not recorded as a number
            lam = None
        if lam is not None or "var_lambda" in given:
            defaults.update(var_lambda=float(lam) if lam is not None else base.var_lambda, var_strength=None)
    cfg = dataclasses.replace(
        base,
        **{**defaults, **given},
        finetune_from=str(source),
        finetune_sparsity=args.sparsity,
        finetune_pattern=args.pattern,
        finetune_scope=_scope(args, base.dataset),
        finetune_pruner=args.pruner,
        finetune_calib_samples=c.calib_samples(args),
        finetune_calib_seq_len=args.calib_seq_len,
        finetune_calib_data=args.calib_data,
        init=None,
        init_exclude=None,
    )  # RUN's weights, not --init
    train(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet, given=given, other_data=args.other_data)
    c.say_on_main(c.finished_line(args.out))
    return 0


def _given(args) -> dict:
    from varprune.commands.flags import given_fields

    return {k: v for k, v in given_fields(args).items() if k not in ("model", "dataset")}  # --model hf:DIR's


def _scope(args, dataset: str) -> str:
    """--scope, or magnitude's default for the dataset's task (layer-wise for a causal LM: engine.sweep)."""
    from varprune.data import dataset_info
    from varprune.engine.sweep import default_scope

    return args.scope or default_scope(dataset_info(dataset).task)


def _finetune_folder(args) -> int:
    """``finetune --model hf:DIR --dataset D``: the folder's weights pruned one-shot, then trained with the mask
    fixed; the training flags default as for ``train`` (a folder has no run to take them from)."""
    import dataclasses

    from varprune.engine.config import TrainConfig
    from varprune.engine.loop import train
    from varprune.engine.pretrained import is_sequence_classifier, pretrained_problems

    options = {"keep_head": True} if is_sequence_classifier(args.model) else {}
    base = TrainConfig(model=args.model, dataset=args.dataset, model_args=options)
    found = c.mask_problems(args, base)
    if found:
        raise UsageError("; ".join(found))
    cfg = dataclasses.replace(
        base,
        **_given(args),
        finetune_from=args.model,
        finetune_sparsity=args.sparsity,
        finetune_pattern=args.pattern,
        finetune_pruner=args.pruner,
        finetune_calib_samples=c.calib_samples(args),
        finetune_calib_seq_len=args.calib_seq_len,
        finetune_calib_data=args.calib_data,
    )
    found = pretrained_problems(cfg, for_training=True)
    if found:
        raise UsageError("; ".join(found))
    cfg = dataclasses.replace(cfg, finetune_scope=_scope(args, cfg.dataset))
    if args.other_data:
        raise UsageError("--other-data applies to a RUN: a model folder is fine-tuned on the --dataset given")
    train(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet, given=_given(args))
    c.say_on_main(c.finished_line(args.out))
    return 0
