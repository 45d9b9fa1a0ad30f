"""``varprune evaluate``: measure an exported model on its run's test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from varprune.commands import common as c
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser("evaluate", help="measure an exported model on its run's test split")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    c.add_other_data_flag(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.engine.export import evaluate_file

    found = c.device_problem(args.device)
    if not Path(args.file).is_file():
        found.append(f"{args.file} is not a file; give a file written by `varprune export`")
    if found:
        raise UsageError("; ".join(found))
    metrics = evaluate_file(Path(args.file), args.data_dir, args.device, args.other_data)
    other = metrics.pop("other_data", None)
    if other is not None:
        from varprune.engine.identity import other_data_line

        print(other_data_line(args.file, other))
    from varprune.report.tables import METRICS, metric_info

    m = metrics.pop("metric")

    def shown(k, v):
        info = metric_info(k)
        return f"{k}: {info.fmt(v)}{'%' if info.percent else ''}"

    print(
        "  ".join(
            [shown(m, metrics[m])]
            + [shown(k, v) for k, v in metrics.items() if k != m and k in METRICS and isinstance(v, float)]
        )
    )
    if args.json:
        print(json.dumps(metrics | {"metric": m} | ({"other_data": other} if other is not None else {})))
    return 0
