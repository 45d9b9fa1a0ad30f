"""Model registry: ``create_model(name, in_channels, num_classes)``."""
from __future__ import annotations

from typing import Callable

from torch import nn

_MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {}
_TASKS: dict[str, str] = {}


def register_model(name: str, description: str, task: str = "classification"):
    """Decorator: register a builder ``fn(in_channels, num_classes, image_size) -> nn.Module``.

    ``task``: "classification" (output (N, classes)) or "segmentation"
    (output (N, classes, H, W)).
    """
    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = (fn, description)
        _TASKS[name] = task
        return fn
    return wrap


def model_task(name: str) -> str | None:
    """The task a registered model solves (None for names the registry does not know, e.g. timm:)."""
    return _TASKS.get(name)


def list_models() -> list[str]:
    return sorted(_MODELS)


def describe_models() -> dict[str, str]:
    """Registered models, then the ``timm:<name>`` family (not in list_models)."""
    out = {name: _MODELS[name][1] for name in list_models()}
    out["timm:<name>"] = "any timm model, random weights (needs timm; --init FILE for trained weights)"
    return out


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """Build a registered model for ``in_channels`` x ``image_size`` px inputs.

    ``timm:<name>`` builds timm model ``<name>`` (models/timm_adapter.py).
    """
    if name.startswith("timm:"):
        from .timm_adapter import create_timm_model
        return create_timm_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[name][0](in_channels=in_channels, num_classes=num_classes, image_size=image_size)
