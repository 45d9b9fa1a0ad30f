"""Tables and figures: accuracy against sparsity, readable at a glance."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from .checkpoint import atomic_write_bytes, atomic_write_text


def pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def sweep_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table, one row per run: dense accuracy, then 'after BNT / before BNT' per sparsity."""
    sparsities = sorted({r["sparsity"] for _, doc in rows for r in doc["results"]})
    head = ["run", "dense"] + [f"{100 * s:g}%" for s in sparsities]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, doc in rows:
        by_s = {r["sparsity"]: r for r in doc["results"]}
        cells = [label, pct(doc["dense_accuracy"])]
        for s in sparsities:
            r = by_s.get(s)
            cells.append("—" if r is None else f"{pct(r['accuracy_bnt'])} / {pct(r['accuracy'])}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nTest accuracy (%) after one-shot magnitude pruning: with BN re-tuning / without.\n"


def sweep_csv(doc: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sparsity", "realised_sparsity", "accuracy", "accuracy_bnt"])
    for r in doc["results"]:
        w.writerow([r["sparsity"], r["realised_sparsity"], r["accuracy"], r["accuracy_bnt"]])
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


def _finish(plt, fig, ax, path: Path, title: str) -> None:
    ax.set_xlabel("sparsity (% of prunable weights removed, log scale of the kept fraction)")
    ax.set_ylabel("test accuracy (%)")
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
    """Accuracy against sparsity: solid lines after BN re-tuning, dashed before."""
    plt, fig, ax = _figure()
    _sparsity_axis(ax, [r["sparsity"] for _, doc in rows for r in doc["results"]])
    for i, (label, doc) in enumerate(rows):
        color = f"C{i % 10}"
        s = [_x(r["sparsity"]) for r in doc["results"]]
        ax.plot(s, [100 * r["accuracy_bnt"] for r in doc["results"]], "o-", color=color, label=f"{label} (BNT)")
        ax.plot(s, [100 * r["accuracy"] for r in doc["results"]], "x--", color=color, alpha=0.6,
                label=f"{label} (no BNT)")
    _finish(plt, fig, ax, Path(path), title)


def write_sweep(run: Path, doc: dict, label: str) -> None:
    """prune.json, prune.csv and prune.png beside a run's weights."""
    import json
    atomic_write_text(run / "prune.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(run / "prune.csv", sweep_csv(doc))
    sweep_plot([(label, doc)], run / "prune.png", title=f"{label}: one-shot magnitude pruning")


def study_table(summary: dict) -> str:
    """Markdown: mean ± std over seeds per method and sparsity, after BNT and before."""
    methods = summary["methods"]
    sparsities = summary["study"]["sparsities"]
    seeds = summary["study"]["seeds"]

    def cell(ms):
        return f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"

    out = []
    for key, title in (("accuracy_bnt", "after BN re-tuning"), ("accuracy", "before BN re-tuning")):
        head = ["method", "dense"] + [f"{100 * s:g}%" for s in sparsities] + ["time/epoch vs SGD"]
        lines = [f"Test accuracy (%), mean ± std over seeds {seeds}, one-shot pruning {title}:", "",
                 "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for m, e in methods.items():
            ratio = "—" if e["time_vs_sgd"] is None else f"{e['time_vs_sgd']:.2f}x"
            lines.append("| " + " | ".join([m, cell(e["dense"])] +
                                           [cell(e["sparsities"][str(s)][key]) for s in sparsities] + [ratio]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def study_plot(summary: dict, path: str | Path) -> None:
    """Mean accuracy after BNT per method with a ±1 std band; dashed: before BNT."""
    plt, fig, ax = _figure()
    s = summary["study"]["sparsities"]
    _sparsity_axis(ax, s)
    xs = [_x(v) for v in s]
    for i, (m, e) in enumerate(summary["methods"].items()):
        color = f"C{i % 10}"
        mean = [100 * e["sparsities"][str(x)]["accuracy_bnt"][0] for x in s]
        std = [100 * e["sparsities"][str(x)]["accuracy_bnt"][1] for x in s]
        ax.plot(xs, mean, "o-", color=color, label=f"{m} (BNT)")
        ax.fill_between(xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                        color=color, alpha=0.2)
        ax.plot(xs, [100 * e["sparsities"][str(x)]["accuracy"][0] for x in s], "--", color=color, alpha=0.5,
                label=f"{m} (no BNT)")
    seeds = summary["study"]["seeds"]
    _finish(plt, fig, ax, Path(path), f"Study: mean ± std over {len(seeds)} seed(s)")
