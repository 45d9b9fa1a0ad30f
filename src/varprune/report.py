"""Tables and figures: the task's primary metric against sparsity, readable at a glance.

Every function reads prune.json / report.json documents; none trains or loads a model.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .checkpoint import atomic_write_bytes, atomic_write_text
from .errors import RunError


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


METRIC_TITLES = {"accuracy": "Test accuracy", "dice": "Test mean foreground Dice"}


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
    return "\n".join(lines) + (f"\n\n{metric_title(metric)} (%) after one-shot magnitude pruning: "
                               f"with BN re-tuning / without.\n")


def sweep_csv(doc: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    m = metric_of(doc)
    w.writerow(["sparsity", "realised_sparsity", m, f"{m}_bnt"])   # an N:M row names its pattern there
    for r in doc["results"]:
        w.writerow([setting_key(r), r["realised_sparsity"], r[m], r[f"{m}_bnt"]])
    return buf.getvalue()


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    return plt, fig, ax


def _sparsity_axis(ax, sparsities) -> None:
    """x = -log10(1 - sparsity): 90%, 99% and 99.9% equally spaced, where pruning is decided."""
    ticks = sorted(set(sparsities))
    ax.set_xticks([_x(s) for s in ticks], [f"{100 * s:g}" for s in ticks])


def _x(s: float) -> float:
    return -math.log10(1.0 - s)


def _finish(plt, fig, ax, path: Path, title: str, metric: str = "accuracy") -> None:
    ax.set_xlabel("sparsity (% of prunable weights removed, log scale of the kept fraction)")
    ax.set_ylabel(metric_title(metric).replace("Test", "test") + " (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def sweep_plot(rows: list[tuple[str, dict]], path: str | Path, title: str = "One-shot magnitude pruning") -> None:
    """The primary metric against sparsity: solid lines after BN re-tuning, dashed before."""
    plt, fig, ax = _figure()
    _sparsity_axis(ax, [r["sparsity"] for _, doc in rows for r in doc["results"] if "pattern" not in r])
    for i, (label, doc) in enumerate(rows):
        color = f"C{i % 10}"
        m = metric_of(doc)
        plain = [r for r in doc["results"] if "pattern" not in r]
        s = [_x(r["sparsity"]) for r in plain]
        ax.plot(s, [100 * r[f"{m}_bnt"] for r in plain], "o-", color=color, label=f"{label} (BNT)")
        ax.plot(s, [100 * r[m] for r in plain], "x--", color=color, alpha=0.6, label=f"{label} (no BNT)")
        for r in doc["results"]:   # N:M patterns: one marker at their realised sparsity, after BNT
            if "pattern" in r:
                ax.plot([_x(r["realised_sparsity"])], [100 * r[f"{m}_bnt"]], "D", color=color, markersize=6)
                ax.annotate(r["pattern"], (_x(r["realised_sparsity"]), 100 * r[f"{m}_bnt"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points", color=color)
    _finish(plt, fig, ax, Path(path), title, metric_of(rows[0][1]) if rows else "accuracy")


def write_sweep(run: Path, doc: dict, label: str) -> None:
    """prune.json, prune.csv and prune.png beside a run's weights."""
    import json
    atomic_write_text(run / "prune.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(run / "prune.csv", sweep_csv(doc))
    sweep_plot([(label, doc)], run / "prune.png", title=f"{label}: one-shot magnitude pruning")


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
        lines = [f"{metric_title(m)} (%), mean ± std over seeds {seeds}, one-shot pruning {title}:", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for method, e in methods.items():
            ratio = "—" if e["time_vs_sgd"] is None else f"{e['time_vs_sgd']:.2f}x"
            lines.append("| " + " | ".join([method, cell(e["dense"])] +
                                           [cell(e["sparsities"][str(s)][key]) for s in sparsities] + [ratio]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def read_prune_json(run: Path) -> dict:
    """RUN/prune.json, checked: missing, damaged or edited is a RunError naming the file and the fix."""
    path = run / "prune.json"
    try:
        doc = json.loads(path.read_text())
        m = metric_of(doc)
        label = doc.get("label", str(run))
        ok = isinstance(label, str) and isinstance(m, str) and isinstance(doc[f"dense_{m}"], (int, float)) and \
            isinstance(doc["results"], list) and doc["results"] and all(
                isinstance(r, dict) and all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool)
                                            for k in ("sparsity", m, f"{m}_bnt")) for r in doc["results"])
    except FileNotFoundError:
        raise RunError(f"{path} not found: run `varprune prune {run}` first") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise RunError(f"{path} is not a varprune prune.json (damaged or edited); rerun `varprune prune {run}`")
    return doc


def read_study_report(study: Path) -> dict:
    """STUDY/report.json and its table, checked by rendering it: a damaged or edited file is a RunError."""
    path = study / "report.json"
    try:
        summary = json.loads(path.read_text())
        spec = summary["study"]
        ok = isinstance(summary["methods"], dict) and bool(summary["methods"]) and \
            all(isinstance(spec[k], list) for k in ("methods", "seeds", "sparsities")) and \
            isinstance(spec["train"], dict) and all(k in spec["train"] for k in ("model", "dataset", "epochs")) and \
            all(k in spec for k in ("scope", "bnt_batches", "bnt_batch_size"))
        table = study_table(summary) if ok else ""
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise RunError(f"{path} is not a varprune study report (damaged or edited); run the same "
                       f"`varprune study --out {study} ...` again to rewrite it")
    return {"summary": summary, "table": table}


def study_plot(summary: dict, path: str | Path) -> None:
    """Mean metric after BNT per method with a ±1 std band; dashed: before BNT."""
    m = summary.get("metric", "accuracy")
    plt, fig, ax = _figure()
    s = summary["study"]["sparsities"]
    _sparsity_axis(ax, s)
    xs = [_x(v) for v in s]
    for i, (method, e) in enumerate(summary["methods"].items()):
        color = f"C{i % 10}"
        mean = [100 * e["sparsities"][str(x)][f"{m}_bnt"][0] for x in s]
        std = [100 * e["sparsities"][str(x)][f"{m}_bnt"][1] for x in s]
        ax.plot(xs, mean, "o-", color=color, label=f"{method} (BNT)")
        ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                        color=color, alpha=0.2)
        ax.plot(xs, [100 * e["sparsities"][str(x)][m][0] for x in s], "--", color=color, alpha=0.5,
                label=f"{method} (no BNT)")
    seeds = summary["study"]["seeds"]
    _finish(plt, fig, ax, Path(path), f"Study: mean ± std over {len(seeds)} seed(s)", m)


# ---------------------------------------------------------------- one HTML page

def _analysis_sections(folder: Path) -> list[dict]:
    """Sections for an analysis folder (analysis.json and its figures), if there is one."""
    import json
    try:
        doc = json.loads((folder / "analysis.json").read_text())
        runs = doc["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    rows = [[label, f"{e.get('hessian_top_eigenvalue', float('nan')):.4g}",
             "—" if e.get("sensitivity_variance_spearman") is None else f"{e['sensitivity_variance_spearman']:+.2f}"]
            for label, e in runs.items()]
    images = [folder / doc["figures"][k] for k in ("histograms", "layer_histograms", "flatness")
              if k in doc.get("figures", {})]
    per_run = [folder / f for e in runs.values() for f in e.get("figures", {}).values()]
    return [{"heading": "Why it works: weights, layers, flatness",
             "paragraphs": ["Weight-magnitude histograms of the final weights (log scale), the largest Hessian "
                            "eigenvalue of the training loss (eval-mode BatchNorm, fixed training batches) and the "
                            "rank correlation between a layer's variance of |w| and the drop of the metric when "
                            f"that layer alone is pruned to {100 * doc.get('sensitivity_sparsity', 0.9):g}% "
                            "(after BN re-tuning)."],
             "tables": [{"header": ["run", "top Hessian eigenvalue", "Spearman(variance, drop)"], "rows": rows}],
             "images": [str(p) for p in images if p.is_file()]},
            {"heading": "Per-run figures: variance over training, global layer sparsity, sensitivity",
             "images": [str(p) for p in per_run if p.is_file()]}]


def _configs(runs) -> dict:
    import json
    out = {}
    for run in runs:
        try:
            out[str(run)] = json.loads((Path(run) / "config.json").read_text())
        except (OSError, ValueError):
            pass
    return out


def runs_html(rows: list[tuple[str, dict]], runs: list[Path], path: Path, analysis: Path | None = None) -> str:
    """One self-contained page for a set of pruned runs (their prune.json documents in ``rows``)."""
    import tempfile

    from .html_report import write_html_report
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / "comparison.png"
        sweep_plot(rows, plot)
        sections = [{"heading": "One-shot pruning", "tables": [sweep_table(rows)], "images": [str(plot)]}]
        sections += _analysis_sections(analysis) if analysis is not None else []
        return write_html_report(path, "varprune: pruning report", sections, configs=_configs(runs))


def study_html(study: Path, path: Path) -> str:
    """One self-contained page for a study folder (report.json, report.png, runs, analysis/)."""
    import json

    from .html_report import write_html_report
    summary = json.loads((study / "report.json").read_text())
    spec = summary["study"]
    runs = [study / "runs" / f"{m}-s{s}" for m in spec["methods"] for s in spec["seeds"]]
    text = study_table(summary)
    tables = [block for block in text.split("\n\n") if block.lstrip().startswith("|")]
    titles = [block for block in text.split("\n\n") if block and not block.lstrip().startswith("|")]
    sections = [{"heading": "Study: " + ", ".join(spec["methods"]) + f" over seeds {spec['seeds']}",
                 "paragraphs": titles + [f"Model {spec['train']['model']} on {spec['train']['dataset']}, "
                                         f"{spec['train']['epochs']} epochs; {spec['scope']} magnitude pruning, BN "
                                         f"re-tuning on {spec['bnt_batches']} x {spec['bnt_batch_size']} training "
                                         f"images."],
                 "tables": tables, "images": [str(study / "report.png")]}]
    sections += _analysis_sections(study / "analysis")
    return write_html_report(path, f"varprune study: {study.name}", sections, configs=_configs(runs))
