"""Figures of results: the primary metric against sparsity, one line per run or a band per method.

The x axis is -log10(1 - sparsity), so 90%, 99% and 99.9% are equally spaced: that is where pruning is decided.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from varprune.report.tables import metric_of, metric_title
from varprune.storage.files import atomic_write_bytes


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


def save_png(fig, path: str | Path, tight_bbox: bool = False) -> str:
    """Write a matplotlib figure as PNG atomically, tagged ``Software: varprune <version>`` (how varprune
    recognises its own figures before replacing one); close it; return the path."""
    import matplotlib.pyplot as plt

    from varprune import __version__

    buf = io.BytesIO()
    fig.savefig(
        buf,
        format="png",
        metadata={"Software": f"varprune {__version__}"},
        **({"bbox_inches": "tight"} if tight_bbox else {}),
    )
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def _finish(plt, fig, ax, path: Path, title: str, metric: str = "accuracy") -> None:
    ax.set_xlabel("sparsity (% of prunable weights removed, log scale of the kept fraction)")
    ax.set_ylabel(metric_title(metric).replace("Test", "test") + " (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_png(fig, path)


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
        for r in doc["results"]:  # N:M patterns: one marker at their realised sparsity, after BNT
            if "pattern" in r:
                ax.plot([_x(r["realised_sparsity"])], [100 * r[f"{m}_bnt"]], "D", color=color, markersize=6)
                ax.annotate(
                    r["pattern"],
                    (_x(r["realised_sparsity"]), 100 * r[f"{m}_bnt"]),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                    color=color,
                )
    _finish(plt, fig, ax, Path(path), title, metric_of(rows[0][1]) if rows else "accuracy")


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
        ax.fill_between(
            xs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)], color=color, alpha=0.2
        )
        ax.plot(
            xs,
            [100 * e["sparsities"][str(x)][m][0] for x in s],
            "--",
            color=color,
            alpha=0.5,
            label=f"{method} (no BNT)",
        )
    seeds = summary["study"]["seeds"]
    _finish(plt, fig, ax, Path(path), f"Study: mean ± std over {len(seeds)} seed(s)", m)
