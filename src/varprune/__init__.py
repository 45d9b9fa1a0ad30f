"""varprune: train networks that survive one-shot magnitude pruning at high sparsity.

The core is VAR, the Variance Amplifying Regularizer (arXiv 2511.14282)::

    from varprune import VarRegularizer
    reg = VarRegularizer(model, lam=1e-6)
    loss = criterion(model(x), y) + reg()

Names are imported on first use, so ``varprune doctor`` works (and says what
is wrong) even where torch or numpy fail to import.
"""

__version__ = "0.4.1"

_EXPORTS = {
    # the regularizers: penalty (autograd) and closed-form gradient
    "VarRegularizer": "numerics.regularizers",
    "L1Regularizer": "numerics.regularizers",
    "HoyerSquareRegularizer": "numerics.regularizers",
    "var_penalty": "numerics.regularizers",
    "l1_penalty": "numerics.regularizers",
    "hoyer_square_penalty": "numerics.regularizers",
    # what is prunable, pruning, BN re-tuning
    "prunable_weights": "numerics.weights",
    "classify_parameters": "numerics.weights",
    "MagnitudePruner": "numerics.pruning",
    "prune_magnitude": "numerics.pruning",
    "realised_sparsity": "numerics.pruning",
    "recalibrate_bn": "numerics.pruning",
    "nm_masks": "numerics.pruning",
    "prune_nm": "numerics.pruning",
    "keep_mask_topk": "numerics.pruning",
    # the calibrated one-shot pruners of the LLM literature (any model)
    "prune_wanda": "numerics.wanda",
    "prune_sparsegpt": "numerics.sparsegpt",
    "PruneResult": "numerics.pruning",
    # models
    "create_model": "models",
    "list_models": "models",
    "register_model": "models",
    "model_task": "models",
    # metrics and analysis
    "dice_score": "numerics.metrics",
    "hessian_top_eigenvalue": "numerics.hessian",
    "loss_profile": "numerics.hessian",
    # shipping a pruned model
    "save_pruned": "storage.pruned_format",
    "load_pruned": "storage.pruned_format",
    "read_pruned_metadata": "storage.pruned_format",
    "MaskKeeper": "numerics.masking",
    "save_hf_folder": "storage.hf_folder",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'varprune' has no attribute {name!r}")


def __dir__():
    return __all__
