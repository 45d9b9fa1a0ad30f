"""``varprune report``: tables, a plot and an HTML page from prune.json files or a study folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from varprune.commands import common as c
from varprune.errors import UsageError


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        help="table, plot and HTML page from existing prune.json files or a study",
        description="Re-print the table of RUNs' prune.json files (or of a STUDY folder), and "
        "optionally write a plot and one self-contained HTML page.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN|STUDY")
    p.add_argument("--plot", help="write a combined plot here (.png)")
    p.add_argument("--html", help="write one self-contained HTML page here (figures embedded, configs, machine)")
    p.add_argument("--analysis", help="an `analyze` output folder to include in the HTML page")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.report.figures import sweep_plot
    from varprune.report.pages import runs_html, study_html
    from varprune.report.results import read_prune_json, read_study_report
    from varprune.report.tables import metric_of, sweep_table

    plot = c.plot_path(args.plot)
    html = Path(args.html) if args.html else None
    if html is not None and (html.is_dir() or html.suffix.lower() not in (".html", ".htm")):
        raise UsageError(f"--html {args.html} must be a file name ending in .html")
    c.recover([Path(r) for r in args.runs])
    if len(args.runs) == 1 and (Path(args.runs[0]) / "report.json").is_file():  # a study folder
        study = read_study_report(Path(args.runs[0]))
        if html is None:
            print(study["table"], end="")  # report.md is this table; report.json is the source
            return 0
        print(f"html: {study_html(Path(args.runs[0]), html)}")
        return 0
    rows = []
    for run in map(Path, args.runs):
        doc = read_prune_json(run)
        rows.append((doc.get("label", str(run)), doc))
    if len({metric_of(d) for _, d in rows}) > 1:
        raise UsageError("these runs report different metrics (accuracy and dice): report them separately")
    print(sweep_table(rows))
    if plot:
        sweep_plot(rows, plot)
        print(f"plot: {plot}")
    if html:
        analysis = Path(args.analysis) if args.analysis else None
        print(f"html: {runs_html(rows, [Path(r) for r in args.runs], html, analysis)}")
    return 0
