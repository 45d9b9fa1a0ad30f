"""The one definition of "prunable weights" used by VAR, pruning and reports.

A prunable weight is the ``weight`` of a convolution or a linear layer: the
tensors with ``dim() >= 2`` that carry a network's multiply-accumulates. Biases,
normalisation parameters, positional embeddings and class tokens are not
prunable (a BatchNorm gamma initialised to ones has zero variance: its VAR term
would be 1/eps).
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_weights(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """Return ``[(name, parameter)]`` for every conv/linear weight with ``dim() >= 2``.

    ``exclude`` holds parameter names or shell-style patterns (``"fc.*"``,
    ``"conv1.weight"``); the words ``"first"`` and ``"last"`` name the first and
    last prunable tensor in module order (the stem and the classifier of most
    models). Order follows ``model.named_modules()`` and is stable.
    """
    found = []
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and module.weight is not None and module.weight.dim() >= 2:
            name = f"{module_name}.weight" if module_name else "weight"
            found.append((name, module.weight))
    exclude = list(exclude)
    if not exclude:
        return found
    names = [n for n, _ in found]
    excluded = set()
    for pattern in exclude:
        if pattern == "first" and names:
            excluded.add(names[0])
        elif pattern == "last" and names:
            excluded.add(names[-1])
        else:
            excluded.update(fnmatch.filter(names, pattern))
    return [(n, p) for n, p in found if n not in excluded]


def as_weight_list(model_or_weights) -> list[tuple[str, torch.Tensor]]:
    """Accept a model, a list of tensors, or a list of ``(name, tensor)`` pairs."""
    if isinstance(model_or_weights, nn.Module):
        return prunable_weights(model_or_weights)
    out = []
    for i, item in enumerate(model_or_weights):
        if isinstance(item, tuple):
            out.append((str(item[0]), item[1]))
        else:
            out.append((f"weights[{i}]", item))
    return out


def count_params(named: list[tuple[str, torch.Tensor]]) -> int:
    return sum(p.numel() for _, p in named)
