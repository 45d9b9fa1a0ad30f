"""The one definition of "prunable weights" used by VAR, pruning and reports.

Prunable weights are the matrices that carry a network's multiply-accumulates.
The rule, for a parameter ``p`` with ``p.dim() >= 2`` owned directly by module
``m`` under the name ``leaf``, checked in this order:

1. prunable, if ``leaf == "weight"`` and ``m`` is a convolution (any
   ``nn.Conv*d``/``nn.ConvTranspose*d``), an ``nn.Linear`` (also
   ``NonDynamicallyQuantizableLinear``, the ``out_proj`` of
   ``nn.MultiheadAttention``) or an ``nn.Bilinear``; or if ``m``'s class is
   named ``Conv1D`` (the projection layer of transformers' GPT-2 family, a
   linear layer with its weight transposed) or its class name ends in
   ``Linear`` (third-party linear layers that do not subclass ``nn.Linear``);
2. prunable, if ``leaf`` is ``in_proj_weight`` or ends in ``_proj_weight``
   (``nn.MultiheadAttention``'s packed or separate q/k/v projections, and any
   module that names its projections the same way);
3. prunable, if ``m`` is a recurrent layer (``nn.RNN``/``LSTM``/``GRU``) and
   ``leaf`` starts with ``weight_`` (input, hidden and projection matrices).

Every other parameter with ``dim() >= 2`` is excluded, with the first reason
that applies:

* ``"embedding"``: owned by ``nn.Embedding``/``nn.EmbeddingBag`` or a class
  whose name ends in ``Embedding``. A lookup table, not a multiply-accumulate:
  one row per token, and rare tokens would lose their rows first;
* ``"output embedding"``: the weight of the module a Hugging Face model names as its output embeddings
  (``get_output_embeddings()``: the LM head of a causal or masked language model) when it is not tied to the
  input embedding (tied, it is an ``"embedding"`` already). One row per vocabulary token, as the input table;
  the one-shot pruners of the LLM literature (Wanda, SparseGPT) leave it dense too, so varprune's numbers
  compare with theirs;
* ``"positional embedding/token"``: a ``_``-separated word of ``leaf``
  starts with ``pos`` or ends in ``token``/``tokens`` (``pos_embed``, ``pos_embedding``, ``position_embeddings``,
  ``relative_position_bias_table``, ``cls_token``, ``class_token``,
  ``dist_token``, ``register_tokens``, ...): added to activations, not
  multiplied with them;
* ``"norm"``: owned by a normalisation layer (BatchNorm, LayerNorm,
  GroupNorm, RMSNorm, or a class name containing ``Norm``): a BatchNorm gamma
  initialised to ones has zero variance, its VAR term would be 1/eps;
* ``"bias"``: a word of ``leaf`` contains ``bias`` (e.g. LeViT's ``attention_biases``);
* ``"per-channel scale"``: at most one dimension larger than 1, a vector
  stored with broadcast dimensions (ConvNeXt's ``layer_scale`` of shape
  ``(C, 1, 1)``, Swin-v2's ``logit_scale``);
* ``"unknown"``: none of the above. Not prunable, to be safe; say which
  module it is in an issue so the rule can be extended.

Parameters with ``dim() < 2`` (biases, norm scales) are never prunable. A
parameter shared by several modules (tied weights) is listed once, under the
first name ``model.named_parameters()`` gives it, and is excluded if any of
its owners excludes it (an output layer tied to an input embedding is an
embedding). Order follows ``model.named_modules()``, then registration order
within a module, and is stable.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
PRUNABLE = "prunable"


class WeightSelectionError(ValueError):
    """An ``exclude`` pattern that selects nothing (a typo would otherwise be ignored silently)."""


def _classify(module: nn.Module, leaf: str, p: torch.Tensor) -> str:
    kind = type(module).__name__
    if leaf == "weight" and (isinstance(module, PRUNABLE_TYPES) or kind == "Conv1D" or kind.endswith("Linear")):
        return PRUNABLE
    if leaf == "in_proj_weight" or leaf.endswith("_proj_weight"):
        return PRUNABLE
    if isinstance(module, nn.RNNBase) and leaf.startswith("weight_"):
        return PRUNABLE
    if isinstance(module, EMBEDDING_TYPES) or kind.endswith("Embedding"):
        return "embedding"
    words = leaf.lower().split("_")
    if any(w.startswith("pos") or w.endswith(("token", "tokens")) for w in words):
        return "positional embedding/token"
    if isinstance(module, NORM_TYPES) or "Norm" in kind:
        return "norm"
    if any("bias" in w for w in words):
        return "bias"
    if sum(1 for s in p.shape if s > 1) <= 1:
        return "per-channel scale"
    return "unknown"


def _parameters_with_class(model: nn.Module) -> list[tuple[str, nn.Parameter, str]]:
    """``[(name, parameter, class)]`` for every parameter with dim >= 2, each listed once."""
    found: dict[int, list] = {}
    heads = getattr(model, "get_output_embeddings", None)
    head = heads() if callable(heads) else None
    for module_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if p.dim() < 2:
                continue
            label = "output embedding" if module is head and leaf == "weight" else _classify(module, leaf, p)
            entry = found.get(id(p))
            if entry is None:
                found[id(p)] = [f"{module_name}.{leaf}" if module_name else leaf, p, label]
            elif label != PRUNABLE:  # tied: excluded if any owner excludes it
                entry[2] = entry[2] if entry[2] != PRUNABLE else label
    return [tuple(e) for e in found.values()]


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """For every parameter with ``dim() >= 2``: ``"prunable"`` or the reason it is excluded.

    Reasons are ``"embedding"``, ``"output embedding"``, ``"positional embedding/token"``, ``"norm"``,
    ``"bias"``, ``"per-channel scale"`` and ``"unknown"`` (see the module
    docstring for the rule). Keys are parameter names in
    ``model.named_modules()`` order.
    """
    return {name: label for name, _, label in _parameters_with_class(model)}


def prunable_weights(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, torch.Tensor]]:
    """Return ``[(name, parameter)]`` for every prunable weight (the rule in the module docstring).

    ``exclude`` holds parameter names or shell-style patterns (``"fc.*"``,
    ``"conv1.weight"``); the words ``"first"`` and ``"last"`` name the first and
    last prunable tensor in module order (the stem and the classifier of most
    models). A pattern that matches no prunable weight raises
    `WeightSelectionError` (a ``ValueError``) naming it. Order follows
    ``model.named_modules()`` and is stable.
    """
    found: list[tuple[str, torch.Tensor]] = [
        (name, p) for name, p, label in _parameters_with_class(model) if label == PRUNABLE
    ]
    exclude = list(exclude)
    if not exclude:
        return found
    names = [n for n, _ in found]
    excluded = set()
    for pattern in exclude:
        if pattern in ("first", "last") and names:
            hits = [names[0] if pattern == "first" else names[-1]]
        else:
            hits = fnmatch.filter(names, pattern)
        if not hits:
            raise WeightSelectionError(
                f"--exclude pattern {pattern!r} matches no prunable weight; see `varprune prune --list-weights`"
            )
        excluded.update(hits)
    return [(n, p) for n, p in found if n not in excluded]


def as_weight_list(model_or_weights) -> list[tuple[str, torch.Tensor]]:
    """Accept a model, a list of tensors, or a list of ``(name, tensor)`` pairs."""
    if isinstance(model_or_weights, nn.Module):
        return list(prunable_weights(model_or_weights))
    out: list[tuple[str, torch.Tensor]] = []
    for i, item in enumerate(model_or_weights):
        if isinstance(item, tuple):
            out.append((str(item[0]), item[1]))
        else:
            out.append((f"weights[{i}]", item))
    return out
