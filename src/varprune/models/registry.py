"""Model registry: ``create_model(name, in_channels, num_classes, image_size, **options)``.

Every model is registered with a task, so a caller can refuse a model that does
not fit its dataset before building it:

* image tasks: ``"classification"`` (output ``(N, num_classes)``) and
  ``"segmentation"`` (output ``(N, num_classes, H, W)``); builders are
  ``fn(in_channels, num_classes, image_size, **options)``;
* text tasks (models/hf.py, transformers): ``"language-modeling"`` (output
  ``.logits`` of shape ``(N, T, vocab_size)``) and ``"text-classification"``
  (``.logits`` of shape ``(N, num_classes)``), and ``"instruction-tuning"``, which every
  causal language model serves as it is (:data:`CAUSAL_TASKS`); builders are
  ``fn(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id,
  pad_token_id, **options)``. The data-dependent sizes (`TEXT_SIZES`)
  reach them as keywords of `create_model`
  (``create_model("gpt2", vocab_size=tok.get_vocab_size(), max_positions=seq_len)``);
  ``in_channels`` and ``image_size`` are ignored there.

Keyword options (``width=``, ``depth=``, ``n_layer=``...) are forwarded to the
builder; an option the builder does not take is a `ModelError`. The
data-dependent arguments are never options (`model_options` does not
list them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

IMAGE_TASKS = ("classification", "segmentation")
TEXT_TASKS = ("language-modeling", "text-classification", "instruction-tuning")
# what a causal LM serves: next-token logits, over a stream's windows or an instruction's response
CAUSAL_TASKS = ("language-modeling", "instruction-tuning")
TASKS = IMAGE_TASKS + TEXT_TASKS

# arguments every image builder takes; not "options"
_BASE_ARGS = ("in_channels", "num_classes", "image_size")
# data-dependent keywords every text builder takes (from the tokenizer and the dataset); not "options"
TEXT_SIZES = ("vocab_size", "max_positions", "num_classes", "bos_token_id", "eos_token_id", "pad_token_id")
_MODELS: dict[str, tuple[Callable[..., nn.Module], str, str]] = {}
# prefix -> {create, task, tasks, options, description}: families named PREFIX<something> (register_prefix)
_PREFIXES: dict[str, dict] = {}


class ModelError(ValueError):
    """A model name, task or option a user gave is not valid."""


def register_model(name: str, description: str, task: str = "classification"):
    """Decorator: register a builder ``fn(in_channels, num_classes, image_size, **options) -> nn.Module``
    (a text task's builder: ``fn(vocab_size, max_positions, num_classes, bos_token_id, eos_token_id,
    pad_token_id, **options)``).

    ``task`` is one of `TASKS`. Keyword arguments of the builder beyond
    the base ones of its task are the model's options.
    """
    if task not in TASKS:
        raise ModelError(f"model {name!r}: task must be one of {', '.join(TASKS)}, not {task!r}")

    def wrap(fn):
        if name in _MODELS:
            raise ModelError(f"model {name!r} registered twice")
        _MODELS[name] = (fn, description, task)
        return fn

    return wrap


def register_prefix(
    prefix: str,
    *,
    create: Callable[..., nn.Module],
    task: Callable[[str], str],
    tasks: tuple[str, ...],
    options: dict[str, object],
    description: tuple[str, str],
) -> None:
    """Register a family of models named ``PREFIX<something>`` (``hf:<dir>``, models/hf.py).

    ``create(name, num_classes=..., **options)`` builds one; ``task(name)``
    is the task it was made for, ``tasks`` every task it can serve;
    ``options`` its ``{option: default}``; ``description`` is ``(placeholder, text)``
    for the list of models (``hf:<dir>``). The family's module calls this at
    import, so the registry never imports it (no import circle).
    """
    if prefix in _PREFIXES:
        raise ModelError(f"model prefix {prefix!r} registered twice")
    _PREFIXES[prefix] = dict(create=create, task=task, tasks=tasks, options=options, description=description)


def _family(name: str) -> dict | None:
    return next((f for p, f in _PREFIXES.items() if name.startswith(p)), None)


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
    serving = CAUSAL_TASKS[:1] if task in CAUSAL_TASKS else (task,)
    return sorted(n for n, (_, _, t) in _MODELS.items() if task is None or t in serving)


def describe_models(task: str | None = None) -> dict[str, str]:
    """``{name: one-line description}``, sorted by name, only those of ``task`` if given;
    then the ``timm:<name>`` family (classification) and the ``hf:<dir>`` family (text tasks),
    which are not in list_models."""
    out = {name: _MODELS[name][1] for name in list_models(task)}
    if task in (None, "classification"):
        out["timm:<name>"] = "any timm model, random weights (needs timm; --init FILE for trained weights)"
    for prefix, family in _PREFIXES.items():
        if task is None or task in family["tasks"]:
            out[f"{prefix}<{family['description'][0]}>"] = family["description"][1]
    return out


def model_task(name: str) -> str:
    """The task a model is for (timm models: classification).

    ``hf:<dir>`` folders can serve both text tasks (`model_tasks`); this
    is the one the folder was saved for: ``"text-classification"`` for a
    ``...ForSequenceClassification`` or an encoder, else ``"language-modeling"``.
    """
    if name.startswith("timm:"):
        return "classification"
    family = _family(name)
    if family is not None:
        return family["task"](name)
    _check_name(name)
    return _MODELS[name][2]


def model_tasks(name: str) -> tuple[str, ...]:
    """Every task a model can serve: its own (a causal LM: :data:`CAUSAL_TASKS`), or every text task for an
    ``hf:<dir>`` folder (a causal LM, or a sequence classifier with a new head). Check a dataset's task with
    ``task in model_tasks(name)``."""
    family = _family(name)
    if family is not None:
        return family["tasks"]
    own = model_task(name)
    return CAUSAL_TASKS if own == CAUSAL_TASKS[0] else (own,)


def _base_args(name: str) -> tuple[str, ...]:
    return TEXT_SIZES if _MODELS[name][2] in TEXT_TASKS else _BASE_ARGS


def model_options(name: str) -> dict[str, object]:
    """``{option: default}`` for the keyword options ``create_model`` forwards to this model
    (never the data-dependent arguments: image size and channels, vocabulary size...)."""
    family = _family(name)
    if family is not None:
        return dict(family["options"])
    _check_name(name)
    sig = inspect.signature(_MODELS[name][0])
    base = _base_args(name)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name not in base and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **options) -> nn.Module:
    """Build a registered model for ``in_channels`` x ``image_size`` px inputs.

    ``options`` go to the model's builder (see `model_options`); an option
    the model does not take raises `ModelError` naming the ones it does.
    ``timm:<name>`` builds timm model ``<name>`` (models/timm_adapter.py).

    Text models (``gpt2``, ``llama``, ``bert``, ``hf:<dir>``; models/hf.py)
    take their data-dependent sizes as keywords among ``options``
    (`TEXT_SIZES`: ``vocab_size``, ``max_positions``, ``pad_token_id``...;
    ``hf:<dir>`` also ``task``), ``num_classes`` as the number of labels of a
    text classifier, and ignore ``in_channels`` and ``image_size``.
    """
    if name.startswith("timm:"):
        from .timm_adapter import create_timm_model

        return create_timm_model(
            name, in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options
        )
    family = _family(name)
    if family is not None:
        return family["create"](name, num_classes=num_classes, **options)
    _check_name(name)
    text = _MODELS[name][2] in TEXT_TASKS
    sizes = {k: options.pop(k) for k in TEXT_SIZES if k in options} if text else {}
    if options:
        known = model_options(name)
        unknown = sorted(set(options) - set(known))
        if unknown:
            offer = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise ModelError(f"model {name!r} has no option {', '.join(unknown)}; its options: {offer}")
    if text:
        sizes.setdefault("num_classes", num_classes)
        return _MODELS[name][0](**sizes, **options)
    return _MODELS[name][0](in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
