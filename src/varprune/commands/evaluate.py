"""``varprune evaluate``: measure an exported model on its run's test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from varprune.commands import common as c
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "evaluate",
        help="measure an exported model on its run's test split, or a causal LM's commonsense accuracy",
    )
    p.add_argument(
        "file", metavar="FILE", help="a file written by `varprune export` (with --commonsense: or a run, or hf:DIR)"
    )
    p.add_argument("--data-dir", help="dataset folder, if not the one the run was trained from")
    c.add_other_data_flag(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    p.add_argument(
        "--commonsense",
        metavar="DIR",
        help="instead of the test split: accuracy on each DIR/<task>/test.json of LLM-Adapters' commonsense tasks "
        "(boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa), answers "
        "generated greedily from the Alpaca prompt",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="prompts generated together with --commonsense (default 16)"
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.engine.export import evaluate_file

    found = c.device_problem(args.device)
    if args.commonsense is not None:
        return _commonsense(args, found)
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


def _commonsense(args, found: list[str]) -> int:
    from varprune.data.commonsense import read_commonsense
    from varprune.engine.commonsense import commonsense_accuracy, format_commonsense, load_for_generation

    where = Path(args.file[3:] if args.file.startswith("hf:") else args.file)
    if not where.exists():
        found.append(f"{where} does not exist; give a file written by `varprune export`, a run folder or hf:DIR")
    if not 1 <= args.batch_size <= 4096:
        found.append(f"--batch-size must be in [1, 4096], got {args.batch_size}")
    if found:
        raise UsageError("; ".join(found))
    read_commonsense(args.commonsense)  # the test sets are checked before the model is loaded
    model, tokenizer, device, amp = load_for_generation(args.file, args.device)
    result = commonsense_accuracy(
        model, tokenizer, args.commonsense, device, amp, args.batch_size, log=None if args.json else print
    )
    print(format_commonsense(result))
    if args.json:
        print(json.dumps(result))
    return 0
