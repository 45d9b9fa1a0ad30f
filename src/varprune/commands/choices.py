"""``varprune choices``: multiple-choice task files for ``--choices``; ``convert`` makes one from a public task's
published rows, ``show`` checks one (or ``fortunes-endings``) and prints its size and first question."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    from varprune.data.choices import FORMATS

    p = sub.add_parser(
        "choices",
        help="make and check the multiple-choice files of --choices",
        description="Multiple-choice task files for `--choices` (one JSON object a line: context, choices, "
        "label). `convert` turns a public task's published rows into one, with lm-eval-harness's prompt for the "
        "task; `show` checks a file (or fortunes-endings) and prints its first question.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True
    conv = actions.add_parser(
        "convert",
        help="a public task's rows (JSON lines or a JSON list, as published) to a --choices file",
        description="Convert IN (the task's published rows: JSON lines or a JSON list, e.g. the Hugging Face "
        "dataset's test split saved with to_json) into OUT, following lm-eval-harness's doc_to_text and "
        "doc_to_choice: boolq (super_glue/boolq: passage, question, label), piqa (goal, sol1, sol2, label), "
        "siqa (context, question, answerA-C, label 1-3), hellaswag (activity_label, ctx_a, ctx_b, endings, "
        "label; lm-eval's preprocessing), winogrande (sentence with _, option1, option2, answer 1-2; partial "
        "scoring), arc (question, choices.text/label, answerKey; ARC-Easy and ARC-Challenge), openbookqa "
        "(question_stem, choices, answerKey).",
    )
    conv.add_argument("--format", required=True, choices=sorted(FORMATS), help="the task the rows are from")
    conv.add_argument("input", metavar="IN")
    conv.add_argument("output", metavar="OUT")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT even if it is not a --choices file")
    conv.set_defaults(func=convert)
    show = actions.add_parser("show", help="check --choices files and print each one's size and first question")
    show.add_argument("files", nargs="+", metavar="FILE")
    show.set_defaults(func=show_files)
    return p


def _is_choices_file(path: Path) -> bool:
    from varprune.data.base import DatasetError
    from varprune.data.choices import read_choices

    try:
        read_choices(path)
        return True
    except (DatasetError, OSError):
        return False


def convert(args) -> int:
    from varprune.data.choices import FORMATS, convert_file
    from varprune.errors import RunError
    from varprune.storage.files import check_output_file

    found = []
    if args.format not in FORMATS:
        found.append(f"--format {args.format}: choose from {', '.join(FORMATS)}")
    if not Path(args.input).is_file():
        found.append(f"IN {args.input} is not a file; give the task's published rows (JSON lines or a JSON list)")
    try:
        check_output_file(args.output, "OUT", args.overwrite, ours=_is_choices_file)
    except RunError as e:
        found.append(str(e))
    if Path(args.input).resolve() == Path(args.output).resolve():
        found.append("IN and OUT are the same file; give another OUT")
    if found:
        raise UsageError("; ".join(found))
    n = convert_file(args.format, args.input, args.output)
    print(f"wrote {args.output}: {n} questions ({args.format})")
    return 0


def show_files(args) -> int:
    from varprune.data.choices import load_choice_sets

    for s in load_choice_sets(args.files):
        first = s.items[0]
        print(
            f"{s.name}: {len(s.items)} questions from {s.source}; first: {json.dumps(first.context)[:200]} -> "
            f"{json.dumps(first.choices[first.label])[:100]} (of {len(first.choices)})"
        )
    return 0
