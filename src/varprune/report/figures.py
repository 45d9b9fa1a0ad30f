"""Figures of results: the primary metric against sparsity, one line per run or a band per method.

The x axis is -log10(1 - sparsity), so 90%, 99% and 99.9% are equally spaced: that is where pruning is decided.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from varprune.report.tables import metric_info, metric_of, pruner_of
from varprune.storage.files import atomic_write_bytes


def _figure(panels: int = 1):
    """A figure of ``panels`` axes one above the other: ``(plt, fig, ax)``, or ``(plt, fig, [ax, ...])``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(panels, 1, figsize=(7, 4.5 * panels), dpi=120, squeeze=False)
    return plt, fig, axes[0][0] if panels == 1 else [a[0] for a in axes]


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


def _value(metric: str, v: float) -> float:
    """What a figure plots: percent for fractions, the metric itself otherwise (perplexity)."""
    return 100 * v if metric_info(metric).percent else v


def _finish(plt, fig, ax, path: Path, title: str, metric: str = "accuracy") -> None:
    info = metric_info(metric)
    ax.set_xlabel("sparsity (% of prunable weights removed, log scale of the kept fraction)")
    ax.set_ylabel(
        info.title.replace("Test", "test")
        + info.unit
        + ("" if info.higher_is_better else ", log scale (lower is better)")
    )
    ax.set_title(title)
    if info.percent:
        ax.set_ylim(0, 100)
    else:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    # beside the axes, never on the curves (they fall towards the lower left, where a legend used to sit)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    save_png(fig, path, tight_bbox=True)


_STYLES = {"magnitude": "o-", "wanda": "s-", "sparsegpt": "^-"}


def sweep_plot(rows: list[tuple[str, dict]], path: str | Path, title: str = "One-shot magnitude pruning") -> None:
    """The primary metric against sparsity, one colour per run, one marker per pruner: solid lines after BN
    re-tuning, dashed before (one line where nothing was re-tuned); N:M patterns as diamonds at their realised
    sparsity. Sweeps with ``--choices`` get a second panel below: the multiple-choice accuracy (the mean ``acc``
    over tasks) of the same settings."""
    has_choices = any("dense_choices" in doc for _, doc in rows)
    plt, fig, ax = _figure(2 if has_choices else 1)
    if has_choices:
        ax, below = ax
        _choices_panel(below, rows)
    _sparsity_axis(ax, [r["sparsity"] for _, doc in rows for r in doc["results"] if "pattern" not in r])
    for i, (label, doc) in enumerate(rows):
        color = f"C{i % 10}"
        m = metric_of(doc)
        retuned = doc.get("bn_retuning", True) and all(f"{m}_bnt" in r for r in doc["results"])
        pruners = list(dict.fromkeys(pruner_of(r) for r in doc["results"]))
        for pruner in pruners:
            mine = [r for r in doc["results"] if pruner_of(r) == pruner]
            plain = [r for r in mine if "pattern" not in r]
            name = label if pruners == ["magnitude"] else f"{label}, {pruner}"
            s = [_x(r["sparsity"]) for r in plain]
            style = _STYLES.get(pruner, "o-")
            main = f"{m}_bnt" if retuned else m
            ax.plot(
                s, [_value(m, r[main]) for r in plain], style, color=color, label=f"{name} (BNT)" if retuned else name
            )
            if retuned:
                ax.plot(
                    s,
                    [_value(m, r[m]) for r in plain],
                    style[0] + "--",
                    color=color,
                    alpha=0.5,
                    label=f"{name} (no BNT)",
                )
            for r in mine:  # N:M patterns: one marker at their realised sparsity
                if "pattern" in r:
                    y = _value(m, r[main])
                    ax.plot([_x(r["realised_sparsity"])], [y], "D", color=color, markersize=6)
                    ax.annotate(
                        r["pattern"] + ("" if pruner == "magnitude" else f" {pruner}"),
                        (_x(r["realised_sparsity"]), y),
                        fontsize=7,
                        xytext=(4, 4),
                        textcoords="offset points",
                        color=color,
                    )
    _finish(plt, fig, ax, Path(path), title, metric_of(rows[0][1]) if rows else "accuracy")


def _choices_panel(ax, rows: list[tuple[str, dict]]) -> None:
    """The mean multiple-choice ``acc`` (percent) against sparsity, styled as the main panel; dotted: dense."""
    _sparsity_axis(ax, [r["sparsity"] for _, doc in rows for r in doc["results"] if "pattern" not in r])
    for i, (_, doc) in enumerate(rows):
        if "dense_choices" not in doc:
            continue
        color = f"C{i % 10}"
        ax.axhline(100 * doc["dense_choices"]["mean"]["acc"], color=color, linestyle=":", alpha=0.6)
        for pruner in dict.fromkeys(pruner_of(r) for r in doc["results"]):
            mine = [r for r in doc["results"] if pruner_of(r) == pruner and "choices" in r]
            plain = [r for r in mine if "pattern" not in r]
            ax.plot(
                [_x(r["sparsity"]) for r in plain],
                [100 * r["choices"]["mean"]["acc"] for r in plain],
                _STYLES.get(pruner, "o-"),
                color=color,
            )
            for r in mine:
                if "pattern" in r:
                    ax.plot([_x(r["realised_sparsity"])], [100 * r["choices"]["mean"]["acc"]], "D", color=color)
    names = ", ".join(next(doc["dense_choices"]["tasks"] for _, doc in rows if "dense_choices" in doc))
    ax.set_ylabel("multiple-choice acc (%), mean over tasks")
    ax.set_xlabel("sparsity (%); dotted: the dense model")
    ax.set_title(f"--choices: {names}"[:90], fontsize=9)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)


def study_plot(summary: dict, path: str | Path) -> None:
    """Mean metric per method (and pruner) with its 95% interval as a band (± 1 std for a summary of 0.2);
    dashed: before BN re-tuning, where it applies."""
    m = summary.get("metric", "accuracy")
    plt, fig, ax = _figure()
    s = summary["study"]["sparsities"]
    _sparsity_axis(ax, s)
    xs = [_x(v) for v in s]
    retuned = summary.get("bn_retuning", True)
    main = f"{m}_bnt" if retuned else m
    i = 0
    for method, e in summary["methods"].items():
        pruners = list(dict.fromkeys(c.get("pruner", "magnitude") for c in e["sparsities"].values()))
        for pruner in pruners:
            color = f"C{i % 10}"
            i += 1
            cells = [e["sparsities"][str(x) if pruner == "magnitude" else f"{pruner}:{x}"] for x in s]
            mean = [_value(m, c[main][0]) for c in cells]
            if all("ci95" in c for c in cells):
                bands = [c.get("ci95_bnt" if retuned else "ci95") or [c[main][0]] * 2 for c in cells]
                lo, hi = [_value(m, b[0]) for b in bands], [_value(m, b[1]) for b in bands]
            else:
                lo = [_value(m, c[main][0] - c[main][1]) for c in cells]
                hi = [_value(m, c[main][0] + c[main][1]) for c in cells]
            name = method if pruners == ["magnitude"] else f"{method}, {pruner}"
            ax.plot(xs, mean, _STYLES.get(pruner, "o-"), color=color, label=f"{name} (BNT)" if retuned else name)
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2)
            if retuned:
                ax.plot(xs, [_value(m, c[m][0]) for c in cells], "--", color=color, alpha=0.5, label=f"{name} (no BNT)")
    seeds = summary["study"]["seeds"]
    band = "95% interval" if "dense_ci95" in next(iter(summary["methods"].values())) else "± std"
    _finish(plt, fig, ax, Path(path), f"Study: mean over {len(seeds)} seed(s), band {band}", m)
