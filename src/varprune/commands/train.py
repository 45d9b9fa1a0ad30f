"""``varprune train``: train one run into a run folder, or continue one (``--resume``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.commands.flags import add_flags
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train one run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model with or without VAR into a run folder.",
        epilog=epilog,
    )
    p.add_argument("--out", help="run folder to create")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN from its last complete epoch (--device, --data-dir, --fsdp and --grad-checkpoint "
        "may be given: they describe the machine)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --out (and the prune results made from its weights); the old run is "
        "kept until the new one has written its first checkpoint",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_flags(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.commands.flags import from_args, given_fields
    from varprune.engine import distributed
    from varprune.engine.config import flag_of
    from varprune.engine.loop import train
    from varprune.engine.runconfig import load_run_config
    from varprune.engine.rundir import RunFolder

    if args.resume:
        given = given_fields(args)
        machine = {k: given.pop(k) for k in ("device", "data_dir", "fsdp", "grad_checkpoint") if k in given}
        flags = [flag_of(k) for k in given] + ["--out"] * bool(args.out) + ["--overwrite"] * bool(args.overwrite)
        if flags:
            raise UsageError(
                f"--resume takes its configuration from RUN/config.json; drop {', '.join(flags)} "
                f"(only --device, --data-dir, --fsdp and --grad-checkpoint may change)"
            )
        run = Path(args.resume)
        folder = RunFolder(run)
        if folder.replacement() is not None:  # an interrupted --overwrite: finish or undo it before reading
            if distributed.launched():
                raise UsageError(
                    f"{run} is half replaced by an interrupted `varprune train --overwrite`; run "
                    f"`varprune train --resume {run}` once without torchrun to mend it first"
                )
            folder.recover_if_idle()
        cfg = load_run_config(run)
        for key, value in machine.items():
            setattr(cfg, key, value)
        if cfg.fsdp and "fsdp" not in machine and not distributed.launched():
            cfg.fsdp = False  # a sharded run continues in one process too: its checkpoint is whole
        train(cfg, run, resume=True, progress=not args.quiet)
        return 0
    if not args.out:
        raise UsageError("train needs --out RUN_DIR (or --resume RUN_DIR)")
    train(from_args(args), args.out, overwrite=args.overwrite, progress=not args.quiet, given=given_fields(args))
    c.say_on_main(c.finished_line(args.out))
    return 0
