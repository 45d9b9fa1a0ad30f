"""Why a network survives pruning: weight magnitudes, per-layer variance,
where global pruning cuts, which layers are sensitive, and loss flatness.

Pure functions on models and tensors, plus figure writers. Nothing here loads
data or parses arguments: the caller hands in models, an ``evaluate(model) ->
float`` callback (the task's primary metric, higher is better) and a
``bnt(model)`` callback (BatchNorm re-tuning in place). Every figure is a PNG
written atomically; each writer returns the path it wrote, as a string.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import atomic_write_bytes
from .hessian import AnalysisError
from .pruning import MagnitudePruner, check_sparsity
from .regularizers import VarRegularizer
from .weights import prunable_weights

__all__ = [
    "AnalysisError", "magnitude_histograms", "magnitude_histogram_figure", "layer_histogram_figure",
    "layer_variances", "layer_variance_figure", "global_layer_sparsity", "layer_sparsity_figure",
    "layer_sensitivity", "spearman", "sensitivity_figure", "flatness_figure",
]


# ---------------------------------------------------------------------------- figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str | Path) -> str:
    path = Path(path)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # long layer names stay whole
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def _short(name: str) -> str:
    return name[:-len(".weight")] if name.endswith(".weight") else name


# ---------------------------------------------------------------------------- magnitudes

def _prunable(model: nn.Module, what: str) -> list[tuple[str, torch.Tensor]]:
    named = prunable_weights(model)
    if not named:
        raise AnalysisError(f"{what}: the model has no prunable (conv or linear) weights")
    return named


def magnitude_histograms(named_models: Mapping[str, nn.Module], bins: int = 60) -> dict:
    """Histograms of log10 |w| over the prunable weights of each model, global and per layer.

    All models share one set of ``bins`` log-spaced edges spanning the smallest
    non-zero and the largest magnitude over all of them, so runs overlay.
    Exact zeros (pruned weights) have no logarithm: they are counted apart.

    Returns ``{"edges": [bins + 1 floats, |w| values], "labels": [...],
    "global": {label: counts}, "zeros": {label: n}, "numel": {label: n},
    "layers": {layer: {label: counts}}, "layer_zeros": {layer: {label: n}}}``;
    layers are in module order of the first model (a layer missing from a
    model is left out for that model).
    """
    if not named_models:
        raise AnalysisError("magnitude_histograms: no models given")
    if bins < 1:
        raise AnalysisError(f"bins must be >= 1, got {bins}")
    mags = {}
    for label, model in named_models.items():
        mags[label] = {n: p.detach().abs().reshape(-1).double().cpu().numpy()
                       for n, p in _prunable(model, f"model {label!r}")}
    nonzero = [m[m > 0] for per in mags.values() for m in per.values()]
    nonzero = np.concatenate(nonzero) if nonzero else np.zeros(0)
    if nonzero.size == 0:
        lo, hi = -8.0, 0.0
    else:
        lo, hi = math.log10(nonzero.min()), math.log10(nonzero.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
    edges = np.logspace(lo, hi, bins + 1)
    if nonzero.size:  # exact end points: no weight falls outside by rounding of 10**log10
        edges[0], edges[-1] = min(edges[0], nonzero.min()), max(edges[-1], nonzero.max())
    out = {"edges": edges.tolist(), "labels": list(named_models), "global": {}, "zeros": {}, "numel": {},
           "layers": {}, "layer_zeros": {}}
    layer_order = list(next(iter(mags.values())))
    for per in list(mags.values())[1:]:
        layer_order += [n for n in per if n not in layer_order]
    for label, per in mags.items():
        allm = np.concatenate(list(per.values()))
        out["global"][label] = np.histogram(allm[allm > 0], edges)[0].tolist()
        out["zeros"][label] = int((allm == 0).sum())
        out["numel"][label] = int(allm.size)
    for name in layer_order:
        out["layers"][name], out["layer_zeros"][name] = {}, {}
        for label, per in mags.items():
            if name in per:
                m = per[name]
                out["layers"][name][label] = np.histogram(m[m > 0], edges)[0].tolist()
                out["layer_zeros"][name][label] = int((m == 0).sum())
    return out


def _hist_lines(ax, edges, counts_by_label, zeros_by_label, labels):
    for i, label in enumerate(labels):
        if label not in counts_by_label:
            continue
        z = zeros_by_label.get(label, 0)
        ax.stairs(counts_by_label[label], edges, color=f"C{i % 10}",
                  label=f"{label}" + (f" ({z} exact zeros)" if z else ""))
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
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    note = "" if len(shown) == len(layers) else f" ({len(shown)} of {len(layers)} layers, evenly spaced)"
    fig.suptitle(f"|w| per layer, log-log{note}", fontsize=10)
    fig.legend(handles, [l.split(" (")[0] for l in labels], loc="lower right", fontsize=7)
    return _save(plt, fig, path)


# ---------------------------------------------------------------------------- variance

def layer_variances(model: nn.Module) -> dict[str, float]:
    """Per prunable layer, the population variance of |w| as VAR sees it (sqrt(w^2 + 1e-8)), float64."""
    _prunable(model, "layer_variances")
    return VarRegularizer(model, 0.0).variances()


def layer_variance_figure(history: Sequence[tuple[int, Mapping[str, float]]], path: str | Path,
                          final: Mapping[str, float] | None = None, final_epoch: int | None = None,
                          title: str = "Per-layer variance of |w| over training") -> str:
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
        for n, v in final.items():
            ax.plot([x], [v], "o", color=colour[n], ms=4, label=None if history else _short(n))
    if not history:
        ax.text(0.5, 0.02, "per-epoch variances were not recorded in this run: final weights only",
                transform=ax.transAxes, ha="center", va="bottom", fontsize=8, color="0.3",
                bbox=dict(facecolor="white", edgecolor="0.7", alpha=0.9))
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

def global_layer_sparsity(model: nn.Module, sparsities: Iterable[float],
                          exclude: Iterable[str] = ()) -> dict[float, dict[str, float]]:
    """Fraction of each layer removed by global magnitude pruning, per requested sparsity.

    Uses the same masks as the pruning protocol (:class:`MagnitudePruner`,
    ties by position); the model is not modified. Returns ``{sparsity:
    {layer: fraction pruned}}`` in module order.
    """
    sparsities = [check_sparsity(s) for s in sparsities]
    if not sparsities:
        raise AnalysisError("global_layer_sparsity: no sparsities given")
    _prunable(model, "global_layer_sparsity")
    pruner = MagnitudePruner(model, "global", exclude)
    out = {}
    for s in sparsities:
        masks = pruner.masks(s)
        out[s] = {n: (m.numel() - int(m.sum())) / m.numel() for n, m in masks.items()}
    return out


def layer_sparsity_figure(layer_sparsity: Mapping[float, Mapping[str, float]], path: str | Path,
                          title: str = "Where global magnitude pruning cuts") -> str:
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

def _snapshot(model: nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    modes = [m.training for m in model.modules()]
    return state, modes


@torch.no_grad()
def _restore(model: nn.Module, snap) -> None:
    state, modes = snap
    current = model.state_dict(keep_vars=True)
    for k, v in state.items():
        current[k].data.copy_(v)
    for m, t in zip(model.modules(), modes):
        m.training = t


def layer_sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float],
                      bnt: Callable[[nn.Module], object], sparsity: float = 0.9,
                      exclude: Iterable[str] = ()) -> dict[str, float]:
    """Metric drop when one prunable layer alone is magnitude-pruned at ``sparsity``.

    For each prunable layer in turn (``exclude`` as in :func:`prunable_weights`):
    zero its ``round(sparsity * n)`` smallest-magnitude weights, call
    ``bnt(model)`` (BatchNorm re-tuning in place), then ``evaluate(model)``
    (the primary metric, higher is better); drop = dense - pruned. The dense
    reference goes through the same ``bnt`` + ``evaluate``, so a drop measures
    pruning alone (a layer that is already all zeros has drop 0 when ``bnt``
    and ``evaluate`` are deterministic). Parameters, buffers and train/eval
    flags are restored bit for bit after every layer and at the end, also on
    error. Returns ``{layer: drop}`` in module order.
    """
    s = check_sparsity(sparsity)
    named = prunable_weights(model, exclude)
    if not named:
        raise AnalysisError("layer_sensitivity: no prunable (conv or linear) weights left after exclusions")
    masks = MagnitudePruner(model, "layerwise", exclude).masks(s)
    snap = _snapshot(model)
    out = {}
    try:
        bnt(model)
        dense = float(evaluate(model))
        _restore(model, snap)
        for name, p in named:
            with torch.no_grad():
                p.mul_(masks[name])
            bnt(model)
            out[name] = dense - float(evaluate(model))
            _restore(model, snap)
    finally:
        _restore(model, snap)
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values get the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks, ties given their average rank.

    Needs two equally long sequences of at least two finite numbers. Returns
    nan when either side is constant (its ranks have no spread).
    """
    x = np.asarray(xs, dtype=np.float64).reshape(-1)
    y = np.asarray(ys, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise AnalysisError(f"spearman: {x.size} x values but {y.size} y values")
    if x.size < 2:
        raise AnalysisError("spearman: needs at least two pairs")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise AnalysisError("spearman: values must be finite (drop nan/inf pairs first)")
    rx, ry = _ranks(x), _ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if den == 0.0:
        return float("nan")
    return max(-1.0, min(1.0, float((rx * ry).sum()) / den))


def sensitivity_figure(sensitivity: Mapping[str, float], variances: Mapping[str, float], path: str | Path,
                       metric: str = "metric", sparsity: float | None = None) -> str:
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

def flatness_figure(profiles: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                    title: str = "Loss along a filter-normalised random direction") -> str:
    """Loss profiles ``{label: (alphas, losses)}`` (from :func:`varprune.hessian.loss_profile`), overlaid.

    Put extra facts (the Hessian's top eigenvalue) in the labels.
    """
    if not profiles:
        raise AnalysisError("flatness_figure: no profiles given")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, (label, (alphas, losses)) in enumerate(profiles.items()):
        if len(alphas) != len(losses):
            raise AnalysisError(f"flatness_figure: profile {label!r} has {len(alphas)} alphas "
                                f"but {len(losses)} losses")
        ax.plot(alphas, losses, "o-", ms=3, color=f"C{i % 10}", label=label)
    ax.set_xlabel("step along the direction (alpha; 1 = each filter moved by its own norm)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
