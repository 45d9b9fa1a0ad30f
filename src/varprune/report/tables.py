"""Tables: the task's primary metric against sparsity, in Markdown and CSV, readable at a glance.

Every function reads prune.json / report.json documents; none trains or loads a model.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """How a metric of prune.json reads: its title, direction, valid range and unit."""

    title: str
    higher_is_better: bool = True
    lo: float = 0.0
    hi: float = 1.0
    percent: bool = True  # a fraction shown in percent; else shown as is (perplexity)

    def valid(self, x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and self.lo <= x <= self.hi

    def fmt(self, x: float | None, digits: int = 2) -> str:
        if x is None:
            return "—"
        return f"{100 * x:.{digits}f}" if self.percent else f"{x:.{digits}f}"

    @property
    def unit(self) -> str:
        return " (%)" if self.percent else ""


METRICS = {
    "accuracy": Metric("Test accuracy"),
    "dice": Metric("Test mean foreground Dice"),
    "iou": Metric("Test mean foreground IoU"),
    "pixel_accuracy": Metric("Test pixel accuracy"),
    "next_token_accuracy": Metric("Test next-token accuracy"),
    "perplexity": Metric("Test perplexity", higher_is_better=False, lo=1.0, hi=math.inf, percent=False),
}


def metric_info(name: str) -> Metric:
    return METRICS.get(name, Metric(f"Test {name}"))


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


METRIC_TITLES = {name: m.title for name, m in METRICS.items()}


def metric_of(doc: dict) -> str:
    """The primary metric of a prune.json (files of 0.1 have no ``metric``: accuracy)."""
    return doc.get("metric", "accuracy")


def metric_title(metric: str) -> str:
    return METRIC_TITLES.get(metric, f"Test {metric}")


def setting_key(row: dict):
    """A result row's setting: its N:M pattern or its requested sparsity."""
    return row.get("pattern") or row["sparsity"]


def setting_label(key) -> str:
    return key if isinstance(key, str) else f"{100 * key:g}%"


def _settings(rows) -> list:
    keys = {setting_key(r) for _, doc in rows for r in doc["results"]}
    return sorted(k for k in keys if not isinstance(k, str)) + sorted(k for k in keys if isinstance(k, str))


def sweep_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table, one row per run: dense metric, then 'after BNT / before BNT' per sparsity (and pattern)."""
    metric = metric_of(rows[0][1]) if rows else "accuracy"
    sparsities = _settings(rows)
    head = ["run", "dense"] + [setting_label(s) for s in sparsities]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, doc in rows:
        by_s = {setting_key(r): r for r in doc["results"]}
        m = metric_of(doc)
        cells = [label, pct(doc[f"dense_{m}"])]
        for s in sparsities:
            r = by_s.get(s)
            cells.append("—" if r is None else f"{pct(r[f'{m}_bnt'])} / {pct(r[m])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\n{metric_title(metric)} (%) after one-shot magnitude pruning: with BN re-tuning / without.\n"
    )


def sweep_csv(doc: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    m = metric_of(doc)
    w.writerow(["sparsity", "realised_sparsity", m, f"{m}_bnt"])  # an N:M row names its pattern there
    for r in doc["results"]:
        w.writerow([setting_key(r), r["realised_sparsity"], r[m], r[f"{m}_bnt"]])
    return buf.getvalue()


def study_table(summary: dict) -> str:
    """Markdown: mean ± std over seeds per method and sparsity, after BNT and before."""
    methods = summary["methods"]
    sparsities = list(summary["study"]["sparsities"]) + list(summary["study"].get("patterns", []))
    seeds = summary["study"]["seeds"]

    m = summary.get("metric", "accuracy")

    def cell(ms):
        return f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"

    out = []
    for key, title in ((f"{m}_bnt", "after BN re-tuning"), (m, "before BN re-tuning")):
        head = ["method", "dense"] + [setting_label(s) for s in sparsities] + ["time/epoch vs SGD"]
        lines = [
            f"{metric_title(m)} (%), mean ± std over seeds {seeds}, one-shot pruning {title}:",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        for method, e in methods.items():
            ratio = "—" if e["time_vs_sgd"] is None else f"{e['time_vs_sgd']:.2f}x"
            lines.append(
                "| "
                + " | ".join(
                    [method, cell(e["dense"])] + [cell(e["sparsities"][str(s)][key]) for s in sparsities] + [ratio]
                )
                + " |"
            )
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------- one HTML page
