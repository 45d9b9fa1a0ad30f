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
        "tenth of its learning rate and no warm-up. Resumable like train.",
        epilog=epilog,
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--out", required=True, help="run folder to create")
    c.add_mask_flags(p)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    c.add_other_data_flag(p)
    add_flags(p, exclude=("dataset", "model", "model_args", "init", "init_exclude", "image_size", "download"))
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import dataclasses

    from varprune.commands.flags import given_fields
    from varprune.data import dataset_info
    from varprune.engine.loop import train
    from varprune.engine.runconfig import load_run_config, read_resolved
    from varprune.engine.sweep import default_scope

    source = Path(args.run)
    found = c.half_replaced([source])
    if found:
        raise UsageError("; ".join(found))
    base = load_run_config(source)
    found = c.mask_problems(args, base)
    if found:
        raise UsageError(found[0])
    given = given_fields(args)
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
        finetune_scope=args.scope or default_scope(dataset_info(base.dataset).task),
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
