"""The one-shot pruners by name: magnitude (global or layer-wise, and N:M), Wanda and SparseGPT.

``prune_once(model, pruner, setting, ...)`` prunes ``model`` in place at one setting, a sparsity or an
``"N:M"`` pattern, and returns the keep-masks with what was left dense. Every command that prunes (the sweep,
export, finetune) goes through it; adding a pruner is one function and its name here.
"""

from __future__ import annotations

from torch import nn

from varprune.numerics.pruning import MagnitudePruner, PruningError, apply_masks_, pattern_masks

PRUNERS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")  # they read calibration inputs (from the training split)


def prune_once(
    model: nn.Module,
    pruner: str,
    setting,
    scope: str = "global",
    exclude=(),
    calibration=None,
    magnitude: MagnitudePruner | None = None,
    progress=None,
) -> tuple[dict, list[str], dict[str, str]]:
    """Prune ``model`` in place at one setting (a sparsity, or an "N:M" pattern) with ``pruner``; return
    ``(keep-masks, tensors left dense, {layer: why a calibrated pruner left it to magnitude})``.

    ``scope`` applies to magnitude pruning (Wanda compares within output rows, SparseGPT within column blocks);
    ``calibration``: model inputs for Wanda and SparseGPT; ``magnitude``: a MagnitudePruner already made from
    these weights (a sweep sorts once for every sparsity); ``progress``: Wanda and SparseGPT call it with each
    layer's name once they have pruned it (magnitude prunes every layer at once).
    """
    if pruner not in PRUNERS:
        raise PruningError(f"unknown pruner {pruner!r}; choose one of {', '.join(PRUNERS)}")
    if pruner == "magnitude":
        if isinstance(setting, str):
            masks, skipped = pattern_masks(model, None, setting, scope, exclude)
            apply_masks_(model.named_parameters(), masks)
            return masks, skipped, {}
        return (magnitude or MagnitudePruner(model, scope, exclude)).apply(setting), [], {}
    if not calibration:
        raise PruningError(f"{pruner} needs calibration inputs (--calib-samples)")
    from varprune.numerics.sparsegpt import prune_sparsegpt
    from varprune.numerics.wanda import prune_wanda

    prune = prune_wanda if pruner == "wanda" else prune_sparsegpt
    kind = {"pattern": setting} if isinstance(setting, str) else {"sparsity": setting}
    result = prune(model, calibration, exclude=exclude, progress=progress, **kind)
    return dict(result), list(result.skipped), dict(result.fallback)
