"""Model registry: ``create_model(name, in_channels, num_classes, image_size, **options)``.

Every model is registered with a task, ``"classification"`` (output
``(N, num_classes)``) or ``"segmentation"`` (output ``(N, num_classes, H, W)``),
so a caller can refuse a model that does not fit its dataset before building it.
Keyword options (``width=``, ``depth=``...) are forwarded to the builder; an
option the builder does not take is a :class:`ModelError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

TASKS = ("classification", "segmentation")

# positional arguments every builder takes; not "options"
_BASE_ARGS = ("in_channels", "num_classes", "image_size")

_MODELS: dict[str, tuple[Callable[..., nn.Module], str, str]] = {}


class ModelError(ValueError):
    """A model name, task or option a user gave is not valid."""


def register_model(name: str, description: str, task: str = "classification"):
    """Decorator: register a builder ``fn(in_channels, num_classes, image_size, **options) -> nn.Module``.

    ``task`` is ``"classification"`` or ``"segmentation"``. Keyword arguments of
    the builder beyond the three base ones are the model's options.
    """
    if task not in TASKS:
        raise ModelError(f"model {name!r}: task must be one of {', '.join(TASKS)}, not {task!r}")

    def wrap(fn):
        if name in _MODELS:
            raise ModelError(f"model {name!r} registered twice")
        _MODELS[name] = (fn, description, task)
        return fn

    return wrap


def check_int(name: str, value, low: int, high: int | None = None) -> None:
    """A builder's check of an integer option: ModelError naming the option and its range."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"in {low}..{high}"
        raise ModelError(f"{name} must be an integer {span}; got {value!r}")


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")


def list_models(task: str | None = None) -> list[str]:
    """Sorted names of the registered models, only those of ``task`` if given."""
    if task is not None and task not in TASKS:
        raise ModelError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    return sorted(n for n, (_, _, t) in _MODELS.items() if task is None or t == task)


def describe_models(task: str | None = None) -> dict[str, str]:
    """``{name: one-line description}``, sorted by name, only those of ``task`` if given;
    then the ``timm:<name>`` family (classification, not in list_models)."""
    out = {name: _MODELS[name][1] for name in list_models(task)}
    if task in (None, "classification"):
        out["timm:<name>"] = "any timm model, random weights (needs timm; --init FILE for trained weights)"
    return out


def model_task(name: str) -> str:
    """The task (``"classification"`` or ``"segmentation"``) a model is for (timm models: classification)."""
    if name.startswith("timm:"):
        return "classification"
    _check_name(name)
    return _MODELS[name][2]


def model_options(name: str) -> dict[str, object]:
    """``{option: default}`` for the keyword options ``create_model`` forwards to this model."""
    _check_name(name)
    sig = inspect.signature(_MODELS[name][0])
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name not in _BASE_ARGS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **options) -> nn.Module:
    """Build a registered model for ``in_channels`` x ``image_size`` px inputs.

    ``options`` go to the model's builder (see :func:`model_options`); an option
    the model does not take raises :class:`ModelError` naming the ones it does.
    ``timm:<name>`` builds timm model ``<name>`` (models/timm_adapter.py).
    """
    if name.startswith("timm:"):
        from .timm_adapter import create_timm_model

        return create_timm_model(
            name, in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options
        )
    _check_name(name)
    if options:
        known = model_options(name)
        unknown = sorted(set(options) - set(known))
        if unknown:
            offer = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise ModelError(f"model {name!r} has no option {', '.join(unknown)}; its options: {offer}")
    return _MODELS[name][0](in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
