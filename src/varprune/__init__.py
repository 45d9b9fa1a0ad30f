"""varprune: train networks that survive one-shot magnitude pruning at high sparsity.

The core is VAR, the Variance Amplifying Regularizer (arXiv 2511.14282)::

    from varprune import VarRegularizer
    reg = VarRegularizer(model, lam=1e-6)
    loss = criterion(model(x), y) + reg()
"""
__version__ = "0.1.0"

from .models import create_model, list_models, register_model
from .pruning import MagnitudePruner, prune_magnitude, realised_sparsity, recalibrate_bn
from .regularizers import (HoyerSquareRegularizer, L1Regularizer, VarRegularizer, hoyer_square_penalty,
                           l1_penalty, var_penalty)
from .weights import prunable_weights

__all__ = [
    "VarRegularizer", "L1Regularizer", "HoyerSquareRegularizer", "var_penalty", "l1_penalty",
    "hoyer_square_penalty", "prunable_weights", "prune_magnitude", "MagnitudePruner", "realised_sparsity",
    "recalibrate_bn", "create_model", "list_models", "register_model", "__version__",
]
