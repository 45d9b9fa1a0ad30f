"""``varprune analyze``: weight distributions, per-layer sensitivity and flatness of finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze",
        help="weight distributions, per-layer sensitivity and flatness of runs",
        description="For finished RUNs: weight-magnitude histograms, per-layer variance of |w| over "
        "training, the per-layer sparsity global pruning chooses, one-layer pruning "
        "sensitivity against variance, the top Hessian eigenvalue and a loss profile. "
        "Writes OUT/analysis.json and figures.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", required=True, help="folder for analysis.json and the figures")
    p.add_argument(
        "--sensitivity-sparsity", type=float, default=0.9, help="sparsity of the one-layer pruning (default 0.9)"
    )
    p.add_argument("--no-sensitivity", action="store_true", help="skip the per-layer sensitivity (L evaluations)")
    p.add_argument("--hessian-iters", type=int, default=20, help="power iterations (default 20)")
    c.add_bnt_flags(p)
    p.add_argument("--data-dir")
    c.add_other_data_flag(p)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in --out that varprune did not write (its own are replaced anyway)",
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.engine.analyze import analyze_runs

    found = c.half_replaced([Path(r) for r in args.runs])
    if found:
        raise UsageError("; ".join(found))
    from varprune.engine.analyze import check_analysis_flags

    found = check_analysis_flags(
        args.sensitivity_sparsity, args.hessian_iters, args.bnt_batches, args.bnt_batch_size
    ) + c.device_problem(args.device)
    if found:
        raise UsageError("; ".join(found))
    analyze_runs(
        [Path(r) for r in args.runs],
        Path(args.out),
        args.sensitivity_sparsity,
        bnt_batches=args.bnt_batches,
        bnt_batch_size=args.bnt_batch_size,
        sensitivity=not args.no_sensitivity,
        hessian_iters=args.hessian_iters,
        device=args.device,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
        other_data=args.other_data,
    )
    return 0
