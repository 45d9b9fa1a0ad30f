"""``varprune study``: train and prune several methods x seeds, one report."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.commands.flags import add_flags
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "study",
        help="train and prune several methods x seeds, one report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train every (method, seed), prune each, and write report.md, report.json and "
        "report.png in --out. Finished runs are reused, interrupted ones resumed.",
        epilog=epilog,
    )
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--methods", default="sgd,var", help="comma-separated methods (default sgd,var)")
    p.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated seeds (default 0,1,2: three, for intervals and paired tests; with two the "
        "intervals are wide, with one there are none)",
    )
    p.add_argument(
        "--baseline", help="the method every other is compared with, seed by seed (default: the first of --methods)"
    )
    c.add_sweep_flags(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--no-analysis",
        action="store_true",
        help="skip `analyze` of the first seed of each method (histograms, sensitivity, flatness)",
    )
    c.add_overwrite_flag(p, "report files in --out")
    add_flags(p, exclude=("method", "seed"))
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.commands.flags import from_args, given_fields
    from varprune.engine.checks import Scope, unused_problems
    from varprune.engine.study import run_study

    base = from_args(args)
    scope = Scope.of_config(base, tuple(c.names(args.pruners)))
    found = c.bnt_problems(args) + unused_problems(given_fields(args), c.names(args.methods), base.optimizer, scope)
    found += c.calibration_flag_problems(args, scope)
    seeds = []
    for v in c.names(args.seeds):
        try:
            seeds.append(int(v))
        except ValueError:
            found.append(f"--seeds takes comma-separated integers, got {args.seeds!r}")
            break
    if found:
        raise UsageError("; ".join(found))
    spec = c.sweep_spec(args)
    found += spec.problems()
    if found:
        raise UsageError("; ".join(found))
    run_study(
        Path(args.out),
        base,
        c.names(args.methods),
        seeds,
        spec,
        progress=not args.quiet,
        analysis=not args.no_analysis,
        overwrite=args.overwrite,
        baseline=args.baseline,
    )
    return 0
