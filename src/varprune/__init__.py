"""varprune: train networks that survive one-shot magnitude pruning at high sparsity.

The core is VAR, the Variance Amplifying Regularizer (arXiv 2511.14282)::

    from varprune import VarRegularizer
    reg = VarRegularizer(model, lam=1e-6)
    loss = criterion(model(x), y) + reg()

Names are imported on first use, so ``varprune doctor`` works (and says what
is wrong) even where torch or numpy fail to import.
"""
__version__ = "0.2.0"

_EXPORTS = {
    # the regularizers: penalty (autograd) and closed-form gradient
    "VarRegularizer": "regularizers", "L1Regularizer": "regularizers", "HoyerSquareRegularizer": "regularizers",
    "var_penalty": "regularizers", "l1_penalty": "regularizers", "hoyer_square_penalty": "regularizers",
    # what is prunable, pruning, BN re-tuning
    "prunable_weights": "weights", "classify_parameters": "weights",
    "MagnitudePruner": "pruning", "prune_magnitude": "pruning", "realised_sparsity": "pruning",
    "recalibrate_bn": "pruning", "nm_masks": "pruning", "prune_nm": "pruning", "keep_mask_topk": "pruning",
    # models
    "create_model": "models", "list_models": "models", "register_model": "models", "model_task": "models",
    # metrics and analysis
    "dice_score": "metrics", "hessian_top_eigenvalue": "hessian", "loss_profile": "hessian",
    # shipping a pruned model
    "save_pruned": "sparse_format", "load_pruned": "sparse_format", "read_pruned_metadata": "sparse_format",
    "MaskKeeper": "masking",
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
