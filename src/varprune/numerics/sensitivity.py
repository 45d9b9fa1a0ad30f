"""Per-layer numbers behind the analysis: magnitude histograms, variance of |w|, where global pruning cuts,
one-layer pruning sensitivity, and Spearman's rank correlation.

Pure functions on models and tensors. Nothing here loads data or parses arguments: the caller hands in
models, an ``evaluate(model) -> float`` callback (the task's primary metric) and a ``bnt(model)`` callback
(BatchNorm re-tuning in place). The figures that draw these numbers are in varprune.report.analysis_figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from varprune.numerics.hessian import AnalysisError
from varprune.numerics.pruning import MagnitudePruner, check_sparsity
from varprune.numerics.regularizers import VarRegularizer
from varprune.numerics.weights import prunable_weights

__all__ = [
    "AnalysisError",
    "global_layer_sparsity",
    "layer_sensitivity",
    "layer_variances",
    "magnitude_histograms",
    "spearman",
]


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
        mags[label] = {
            n: p.detach().abs().reshape(-1).double().cpu().numpy() for n, p in _prunable(model, f"model {label!r}")
        }
    pieces = [m[m > 0] for per in mags.values() for m in per.values()]
    nonzero = np.concatenate(pieces) if pieces else np.zeros(0)
    if nonzero.size == 0:
        lo, hi = -8.0, 0.0
    else:
        lo, hi = math.log10(nonzero.min()), math.log10(nonzero.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
    edges = np.logspace(lo, hi, bins + 1)
    if nonzero.size:  # exact end points: no weight falls outside by rounding of 10**log10
        edges[0], edges[-1] = min(edges[0], nonzero.min()), max(edges[-1], nonzero.max())
    out = {
        "edges": edges.tolist(),
        "labels": list(named_models),
        "global": {},
        "zeros": {},
        "numel": {},
        "layers": {},
        "layer_zeros": {},
    }
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


def layer_variances(model: nn.Module) -> dict[str, float]:
    """Per prunable layer, the population variance of |w| as VAR sees it (sqrt(w^2 + 1e-8)), float64."""
    _prunable(model, "layer_variances")
    return VarRegularizer(model, 0.0).variances()


def global_layer_sparsity(
    model: nn.Module, sparsities: Iterable[float], exclude: Iterable[str] = ()
) -> dict[float, dict[str, float]]:
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


def layer_sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    bnt: Callable[[nn.Module], object],
    sparsity: float = 0.9,
    exclude: Iterable[str] = (),
    higher_is_better: bool = True,
    progress: Callable[[int, int], object] | None = None,
) -> dict[str, float]:
    """Metric drop when one prunable layer alone is magnitude-pruned at ``sparsity``.

    For each prunable layer in turn (``exclude`` as in :func:`prunable_weights`):
    zero its ``round(sparsity * n)`` smallest-magnitude weights, call
    ``bnt(model)`` (BatchNorm re-tuning in place), then ``evaluate(model)``
    (the primary metric); drop = dense - pruned when higher is better
    (accuracy, Dice), pruned - dense when lower is better (perplexity): a
    positive drop is always a loss. The dense
    reference goes through the same ``bnt`` + ``evaluate``, so a drop measures
    pruning alone (a layer that is already all zeros has drop 0 when ``bnt``
    and ``evaluate`` are deterministic). Parameters, buffers and train/eval
    flags are restored bit for bit after every layer and at the end, also on
    error. ``progress(done, total)`` is called after every evaluation.
    Returns ``{layer: drop}`` in module order.
    """
    s = check_sparsity(sparsity)
    named = prunable_weights(model, exclude)
    if not named:
        raise AnalysisError("layer_sensitivity: no prunable (conv or linear) weights left after exclusions")
    masks = MagnitudePruner(model, "layerwise", exclude).masks(s)
    snap = _snapshot(model)
    out = {}
    try:
        sign = 1.0 if higher_is_better else -1.0
        bnt(model)
        dense = float(evaluate(model))
        _restore(model, snap)
        if progress is not None:
            progress(1, len(named) + 1)
        for i, (name, p) in enumerate(named):
            with torch.no_grad():
                p.mul_(masks[name])
            bnt(model)
            out[name] = sign * (dense - float(evaluate(model)))
            _restore(model, snap)
            if progress is not None:
                progress(i + 2, len(named) + 1)
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
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
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
