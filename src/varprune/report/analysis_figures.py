"""The analysis figures: weight magnitudes, per-layer variance over training, where global pruning cuts,
layer sensitivity against variance, and loss flatness.

Each writer takes the numbers of :mod:`varprune.numerics.sensitivity` (or of metrics.jsonl) and writes one
PNG atomically; it returns the path it wrote, as a string.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from varprune.numerics.sensitivity import AnalysisError, spearman
from varprune.report.figures import save_png

__all__ = [
    "flatness_figure",
    "layer_histogram_figure",
    "layer_sparsity_figure",
    "layer_variance_figure",
    "magnitude_histogram_figure",
    "sensitivity_figure",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> str:
    fig.tight_layout()
    return save_png(fig, path, tight_bbox=True)  # long layer names stay whole


def _short(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


# ---------------------------------------------------------------------------- magnitudes


def _hist_lines(ax, edges, counts_by_label, zeros_by_label, labels):
    for i, label in enumerate(labels):
        if label not in counts_by_label:
            continue
        z = zeros_by_label.get(label, 0)
        ax.stairs(
            counts_by_label[label], edges, color=f"C{i % 10}", label=f"{label}" + (f" ({z} exact zeros)" if z else "")
        )
    ax.set_xscale("log")
    ax.set_yscale("log")


def magnitude_histogram_figure(hists: dict, path: str | Path, title: str = "Weight magnitudes") -> str:
    """One plot: the histogram of |w| over all prunable weights, one line per run, log-log axes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    _hist_lines(ax, hists["edges"], hists["global"], hists["zeros"], hists["labels"])
    ax.set_xlabel("|w| (log scale)")
    ax.set_ylabel("weights per bin (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def layer_histogram_figure(hists: dict, path: str | Path, max_layers: int = 48, columns: int = 4) -> str:
    """A grid, one panel per prunable layer: histograms of |w|, runs overlaid.

    With more than ``max_layers`` layers an evenly spaced subset is drawn
    (first and last included) and the title says so.
    """
    plt = _plt()
    layers = list(hists["layers"])
    shown = layers
    if len(layers) > max_layers:
        idx = sorted({round(i * (len(layers) - 1) / (max_layers - 1)) for i in range(max_layers)})
        shown = [layers[i] for i in idx]
    cols = max(1, min(columns, len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows + 0.6), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, shown):
        _hist_lines(ax, hists["edges"], hists["layers"][name], hists["layer_zeros"][name], hists["labels"])
        ax.set_title(_short(name), fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    note = "" if len(shown) == len(layers) else f" ({len(shown)} of {len(layers)} layers, evenly spaced)"
    fig.suptitle(f"|w| per layer, log-log{note}", fontsize=10)
    fig.legend(handles, [label.split(" (")[0] for label in labels], loc="lower right", fontsize=7)
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------- variance


def layer_variance_figure(
    history: Sequence[tuple[int, Mapping[str, float]]],
    path: str | Path,
    final: Mapping[str, float] | None = None,
    final_epoch: int | None = None,
    title: str = "Per-layer variance of |w| over training",
) -> str:
    """Per-layer variance of |w| against epoch, log y axis, one line per layer.

    ``history`` is ``[(epoch, {layer: variance}), ...]`` (from metrics.jsonl's
    ``layer_variance`` records). Runs written before that field existed have
    none: pass ``history=[]`` with ``final`` (``layer_variances(model)`` of the
    final weights) and ``final_epoch``; the figure then shows only the final
    point per layer and says so. Lines are coloured by depth (a colour bar
    when there are more than 10 layers, else a legend).
    """
    history = [(int(e), dict(v)) for e, v in history if v]
    if not history and not final:
        raise AnalysisError("layer_variance_figure: no per-epoch variances and no final variances to draw")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    layers: list[str] = []
    for _, v in history:
        layers += [n for n in v if n not in layers]
    if final:
        layers += [n for n in final if n not in layers]
    cmap = plt.get_cmap("viridis")
    colour = {n: cmap(i / max(1, len(layers) - 1)) for i, n in enumerate(layers)}
    for n in layers:
        pts = [(e, v[n]) for e, v in history if n in v]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=colour[n], lw=1.2, label=_short(n))
    if final:
        x = final_epoch if final_epoch is not None else (history[-1][0] if history else 0)
        for n, value in final.items():
            ax.plot([x], [value], "o", color=colour[n], ms=4, label=None if history else _short(n))
    if not history:
        ax.text(
            0.5,
            0.02,
            "per-epoch variances were not recorded in this run: final weights only",
            transform=ax.transAxes,
            ha="center",
            va="bottom",
            fontsize=8,
            color="0.3",
            bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.9),
        )
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("Var(|w|) per layer (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(layers) <= 10:
        ax.legend(fontsize=7)
    else:
        import matplotlib as mpl

        sm = mpl.cm.ScalarMappable(cmap=cmap, norm=mpl.colors.Normalize(0, len(layers) - 1))
        fig.colorbar(sm, ax=ax, label="layer index (input → output)")
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------- where pruning cuts


def layer_sparsity_figure(
    layer_sparsity: Mapping[float, Mapping[str, float]],
    path: str | Path,
    title: str = "Where global magnitude pruning cuts",
) -> str:
    """Fraction pruned per layer (x: layers in order), one line per global sparsity."""
    plt = _plt()
    if not layer_sparsity:
        raise AnalysisError("layer_sparsity_figure: nothing to draw")
    layers = list(next(iter(layer_sparsity.values())))
    width = max(7.0, min(20.0, 0.35 * len(layers) + 2))
    fig, ax = plt.subplots(figsize=(width, 4.8), dpi=110)
    x = np.arange(len(layers))
    for i, (s, per) in enumerate(sorted(layer_sparsity.items())):
        ax.plot(x, [100 * per[n] for n in layers], "o-", ms=3, color=f"C{i % 10}", label=f"{100 * s:g}% global")
        ax.axhline(100 * s, color=f"C{i % 10}", lw=0.6, ls=":")
    ax.set_xticks(x, [_short(n) for n in layers], rotation=90, fontsize=6)
    ax.set_ylim(0, 100)
    ax.set_ylabel("weights removed in the layer (%)")
    ax.set_title(title + " (dotted: the global target)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------- sensitivity


def sensitivity_figure(
    sensitivity: Mapping[str, float],
    variances: Mapping[str, float],
    path: str | Path,
    metric: str = "metric",
    sparsity: float | None = None,
) -> str:
    """Scatter of each layer's drop (y) against its variance of |w| (x, log), Spearman rho in the title.

    Only layers present in both mappings are drawn; each point is labelled
    with its layer's short name.
    """
    names = [n for n in sensitivity if n in variances]
    if len(names) < 2:
        raise AnalysisError("sensitivity_figure: fewer than two layers have both a drop and a variance")
    xs = [variances[n] for n in names]
    ys = [sensitivity[n] for n in names]
    rho = spearman(xs, ys)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    cmap = plt.get_cmap("viridis")
    ax.scatter(xs, ys, c=[cmap(i / max(1, len(names) - 1)) for i in range(len(names))], s=22, zorder=3)
    for n, x, y in zip(names, xs, ys):
        ax.annotate(_short(n), (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points", color="0.3")
    if all(x > 0 for x in xs):
        ax.set_xscale("log")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel("Var(|w|) of the layer (log scale)")
    where = f" at {100 * sparsity:g}%" if sparsity is not None else ""
    ax.set_ylabel(f"{metric} drop when only this layer is pruned{where}")
    rho_txt = "undefined (constant values)" if math.isnan(rho) else f"{rho:+.3f}"
    ax.set_title(f"Layer sensitivity vs variance: Spearman rho = {rho_txt} (n = {len(names)})")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------- flatness


def flatness_figure(
    profiles: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str = "Loss along a filter-normalised random direction",
) -> str:
    """Loss profiles ``{label: (alphas, losses)}`` (from :func:`varprune.hessian.loss_profile`), overlaid.

    Put extra facts (the Hessian's top eigenvalue) in the labels.
    """
    if not profiles:
        raise AnalysisError("flatness_figure: no profiles given")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (label, (alphas, losses)) in enumerate(profiles.items()):
        if len(alphas) != len(losses):
            raise AnalysisError(f"flatness_figure: profile {label!r} has {len(alphas)} alphas but {len(losses)} losses")
        ax.plot(alphas, losses, "o-", ms=3, color=f"C{i % 10}", label=label)
    ax.set_xlabel("step along the direction (alpha; 1 = each filter moved by its own norm)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
