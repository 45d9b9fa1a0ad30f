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
    c.add_overwrite_flag(p, "the --plot and --html files")
    p.add_argument(
        "--allow-stale",
        action="store_true",
        help="report a prune.json even if the run's weights changed since it was made",
    )
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from varprune.report.figures import sweep_plot
    from varprune.report.pages import runs_html, study_html
    from varprune.report.results import read_prune_json, read_study_report
    from varprune.report.tables import metric_of, sweep_table

    plot = c.output_file(args.plot, "--plot", args.overwrite, "png")
    html = c.output_file(args.html, "--html", args.overwrite, "html")
    found = c.half_replaced([Path(r) for r in args.runs])
    if args.analysis is not None:
        found += _analysis_problems(Path(args.analysis), html)
    if found:
        raise UsageError("; ".join(found))
    if len(args.runs) == 1 and (Path(args.runs[0]) / "report.json").is_file():  # a study folder
        study = read_study_report(Path(args.runs[0]))
        if html is None:
            print(study["table"], end="")  # report.md is this table; report.json is the source
            return 0
        print(f"html: {study_html(Path(args.runs[0]), html)}")
        return 0
    rows = []
    for run in map(Path, args.runs):
        doc = read_prune_json(run, allow_stale=args.allow_stale)
        rows.append((doc.get("label", str(run)), doc))
    rows = _distinct_labels([Path(r) for r in args.runs], rows)
    if len({metric_of(d) for _, d in rows}) > 1:
        raise UsageError("these runs report different metrics (accuracy and dice): report them separately")
    print(sweep_table(rows))
    grouped = _by_method([Path(r) for r in args.runs], rows)
    if grouped is not None:
        print(grouped)
    if plot:
        sweep_plot(rows, plot)
        print(f"plot: {plot}")
    if html:
        analysis = Path(args.analysis) if args.analysis else None
        print(f"html: {runs_html(rows, [Path(r) for r in args.runs], html, analysis)}")
    return 0


def _distinct_labels(runs: list[Path], rows: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """Runs of one method under several seeds share a label ("adamw"): name each row by its seed, or by its
    folder where the seed does not tell them apart, so that no two rows of the table or the plot read the same."""
    from varprune.engine.runconfig import load_run_config

    labels = [label for label, _ in rows]
    if len(set(labels)) == len(labels):
        return rows
    if any("pretrained" in doc for _, doc in rows):  # a model folder's sweep (prune --model hf:DIR): no seed
        return [(f"{label} ({run})", doc) for run, (label, doc) in zip(runs, rows)]
    seeds = [load_run_config(run).seed for run in runs]
    named = [f"{label} seed {seed}" if labels.count(label) > 1 else label for label, seed in zip(labels, seeds)]
    if len(set(named)) < len(named):
        named = [f"{label} ({run})" if labels.count(label) > 1 else label for label, run in zip(labels, runs)]
    return [(name, doc) for name, (_, doc) in zip(named, rows)]


def _by_method(runs: list[Path], rows: list[tuple[str, dict]]) -> str | None:
    """Runs that differ only in their seed, grouped by method: means with 95% intervals and paired tests against
    the first method, as a study reports them (None when no method has two seeds; a note when grouping would pair
    runs that are not comparable)."""
    from varprune.engine.config import LOCATION_KEYS
    from varprune.engine.runconfig import load_run_config
    from varprune.engine.study import epoch_time
    from varprune.engine.trained import run_label
    from varprune.report.summary import summarize
    from varprune.report.tables import setting_key, study_table

    if any("pretrained" in doc for _, doc in rows):
        return None  # a model folder's sweep (prune --model hf:DIR) was not trained: no method, no seed
    configs = [load_run_config(run) for run in runs]
    labels = [run_label(cfg) for cfg in configs]  # by method (a sweep of several runs may label them by path)
    if len(set(labels)) == len(labels):
        return None
    seeds: dict[str, list[int]] = {}
    docs: dict = {}
    base: dict | None = None
    times: dict[str, list[float]] = {}
    for run, label, config, (_, doc) in zip(runs, labels, configs, rows):
        cfg = config.to_dict()
        seed = cfg.pop("seed")
        common = {k: v for k, v in cfg.items() if k not in (*LOCATION_KEYS, "method", "var_lambda", "var_strength")}
        if base is None:
            base = common
        elif common != base:
            return "\n(not grouped by method: these runs differ in more than method and seed)\n"
        if (label, seed) in docs:
            return f"\n(not grouped by method: two runs of {label} with seed {seed})\n"
        seeds.setdefault(label, []).append(seed)
        docs[(label, seed)] = doc
        times.setdefault(label, []).append(epoch_time(run))
    order = [setting_key(r) for r in rows[0][1]["results"]]
    if any(sorted(s) != sorted(next(iter(seeds.values()))) for s in seeds.values()) or any(
        [setting_key(r) for r in doc["results"]] != order for doc in docs.values()
    ):
        return "\n(not grouped by method: the methods were not run with the same seeds and settings)\n"
    first = rows[0][1]
    spec = {
        "methods": list(seeds),
        "seeds": sorted(next(iter(seeds.values()))),
        "sparsities": list(dict.fromkeys(s for _, s in order if not isinstance(s, str))),
        "patterns": list(dict.fromkeys(s for _, s in order if isinstance(s, str))),
        "pruners": list(dict.fromkeys(p for p, _ in order)),
        "bnt_batches": first.get("bnt_batches"),
    }
    mean_times = {label: sum(t) / len(t) for label, t in times.items()}
    return "\nBy method:\n\n" + study_table(summarize(spec, docs, mean_times))


def _analysis_problems(folder: Path, html: Path | None) -> list[str]:
    """--analysis must name an `analyze` output folder (its analysis.json), and only makes sense with --html."""
    if html is None:
        return [f"--analysis {folder} goes into the HTML page: add --html FILE.html"]
    if not (folder / "analysis.json").is_file():
        what = (
            "a run folder"
            if (folder / "config.json").is_file()
            else "not an analysis folder"
            if folder.is_dir()
            else "not found"
        )
        return [f"--analysis {folder} is {what}; give the --out folder of `varprune analyze` (it holds analysis.json)"]
    try:
        import json

        doc = json.loads((folder / "analysis.json").read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("runs"), dict):
            raise ValueError
    except (OSError, ValueError, RecursionError):
        return [
            f"--analysis {folder}/analysis.json is not varprune's analysis (damaged or edited); run "
            f"`varprune analyze` again"
        ]
    return []
