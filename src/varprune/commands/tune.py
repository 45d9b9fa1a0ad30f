"""``varprune tune``: choose VAR's strength for a target sparsity by successive halving."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.commands.flags import add_flags
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tune",
        help="choose VAR's strength for a target sparsity by successive halving",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pick VAR's strength s (lambda = s / psi(w_init)) or lambda for --sparsity: "
        "successive halving over a log grid. Round r of R trains its candidates for "
        "ceil(E / 2^(R-r)) epochs (the last round: --epochs E) and keeps the better half; "
        "the choice is the last round's best. Score: the primary metric after one-shot "
        "pruning at --sparsity and BN re-tuning, on a validation split carved from the "
        "training set (the test split is never read; --limit-test caps the validation examples). Runs are kept in "
        "OUT/candidates (the same command resumes). Writes OUT/tune.json and "
        "OUT/tune.png and prints the `varprune train` command for the choice.",
        epilog=epilog,
    )
    p.add_argument("--out", required=True, help="tuning folder")
    p.add_argument("--sparsity", type=float, help="target sparsity in (0, 1), e.g. 0.95 (required)")
    p.add_argument(
        "--search",
        choices=("strength", "lambda"),
        default="strength",
        help="search the relative strength s (default) or lambda itself",
    )
    p.add_argument(
        "--grid",
        type=c.floats_arg,
        help="comma-separated positive candidates (default strength "
        "0.03,0.1,0.3,1,3,10; lambda 1e-7,1e-6,1e-5,1e-4,1e-3)",
    )
    p.add_argument("--rounds", type=int, help="halving rounds (default: the last round compares two candidates)")
    p.add_argument(
        "--baseline",
        default="sgd",
        help="reference method trained for --epochs and scored the same way (default sgd; none to skip)",
    )
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.1,
        help="fraction of the training set held out to score candidates (default 0.1, fixed seed)",
    )
    c.add_scope_flag(p)
    c.add_bnt_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--method", default="var", help="a method with VAR: var (default), var+sam, var+cram+")
    add_flags(p, exclude=("method",))
    c.add_overwrite_flag(p, "tune.json and tune.png in --out")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.commands.flags import from_args, given_fields
    from varprune.engine.checks import Scope, unused_problems
    from varprune.engine.tune import run_tune

    given = given_fields(args)
    searched = [f"--{k.replace('_', '-')}" for k in ("var_lambda", "var_strength") if k in given]
    base = from_args(args)
    found = c.bnt_problems(args) + unused_problems(
        [k for k in given if k not in ("var_lambda", "var_strength")],
        [args.method],
        base.optimizer,
        Scope.of_config(base),
    )
    if searched:
        found.append(f"tune searches VAR's strength: drop {' and '.join(searched)} (--grid sets the candidates)")
    if found:
        raise UsageError("; ".join(found))
    run_tune(
        Path(args.out),
        base,
        args.sparsity,
        args.search,
        args.grid,
        args.rounds,
        None if args.baseline == "none" else args.baseline,
        args.validation_fraction,
        args.scope,
        args.bnt_batches,
        args.bnt_batch_size,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    return 0
