"""The HTML pages: one for a set of pruned runs, one for a study (html.py writes them).

Each page is one self-contained file: tables, the figures embedded, every run's resolved configuration.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from varprune.report.figures import sweep_plot
from varprune.report.html import write_html_report
from varprune.report.tables import markdown_blocks, study_table, sweep_table


def _analysis_sections(folder: Path) -> list[dict]:
    """Sections for an analysis folder (analysis.json and its figures), if there is one."""
    try:
        doc = json.loads((folder / "analysis.json").read_text())
        runs = doc["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    rows = [
        [
            label,
            f"{e.get('hessian_top_eigenvalue', float('nan')):.4g}",
            "—" if e.get("sensitivity_variance_spearman") is None else f"{e['sensitivity_variance_spearman']:+.2f}",
        ]
        for label, e in runs.items()
    ]
    images = [
        folder / doc["figures"][k]
        for k in ("histograms", "layer_histograms", "flatness")
        if k in doc.get("figures", {})
    ]
    per_run = [folder / f for e in runs.values() for f in e.get("figures", {}).values()]
    return [
        {
            "heading": "Why it works: weights, layers, flatness",
            "paragraphs": [
                "Weight-magnitude histograms of the final weights (log scale), the largest Hessian "
                "eigenvalue of the training loss (eval-mode BatchNorm, fixed training batches) and the "
                "rank correlation between a layer's variance of |w| and the drop of the metric when "
                f"that layer alone is pruned to {100 * doc.get('sensitivity_sparsity', 0.9):g}% "
                "(after BN re-tuning)."
            ],
            "tables": [{"header": ["run", "top Hessian eigenvalue", "Spearman(variance, drop)"], "rows": rows}],
            "images": [str(p) for p in images if p.is_file()],
        },
        {
            "heading": "Per-run figures: variance over training, global layer sparsity, sensitivity",
            "images": [str(p) for p in per_run if p.is_file()],
        },
    ]


def _configs(runs) -> dict:
    out = {}
    for run in runs:
        with contextlib.suppress(OSError, ValueError):
            out[str(run)] = json.loads((Path(run) / "config.json").read_text())
    return out


def runs_html(rows: list[tuple[str, dict]], runs: list[Path], path: Path, analysis: Path | None = None) -> str:
    """One self-contained page for a set of pruned runs (their prune.json documents in ``rows``)."""

    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "comparison.png"
        sweep_plot(rows, plot)
        tables, _ = markdown_blocks(sweep_table(rows))
        sections = [{"heading": "One-shot pruning", "tables": tables, "images": [str(plot)]}]
        sections += _analysis_sections(analysis) if analysis is not None else []
        return write_html_report(path, "varprune: pruning report", sections, configs=_configs(runs))


def study_html(study: Path, path: Path) -> str:
    """One self-contained page for a study folder (report.json, report.png, runs, analysis/)."""

    summary = json.loads((study / "report.json").read_text())
    spec = summary["study"]
    runs = [study / "runs" / f"{m}-s{s}" for m in spec["methods"] for s in spec["seeds"]]
    # study_table gives "title:", then its table (or tables, a wide one split), for each table: keep each title
    # with its own table (as the Markdown text above it, which the page draws directly above the table)
    tables, title = markdown_blocks(study_table(summary))
    sections = [
        {
            "heading": "Study: " + ", ".join(spec["methods"]) + f" over seeds {spec['seeds']}",
            "paragraphs": title  # text after the last table, if any
            + [
                f"Model {spec['train']['model']} on {spec['train']['dataset']}, "
                f"{spec['train']['epochs']} epochs; one-shot pruning by {', '.join(spec.get('pruners', ['magnitude']))}"
                f" (magnitude {spec['scope']}); "
                + (
                    f"BN re-tuning on {spec['bnt_batches']} x {spec['bnt_batch_size']} training images."
                    if summary.get("bn_retuning", True)
                    else "no BatchNorm, nothing re-tuned."
                )
            ],
            "tables": tables,
            "images": [str(study / "report.png")],
        }
    ]
    sections += _analysis_sections(study / "analysis")
    return write_html_report(path, f"varprune study: {study.name}", sections, configs=_configs(runs))
