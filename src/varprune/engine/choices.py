"""Multiple-choice accuracy (``--choices``) of any language model in memory: one function that every command
calls (evaluate, prune's sweep, study), whatever the model came from (a run, an exported file, a folder).

:func:`score_choices` is the one call for a caller holding a model and its tokenizer (``--choices`` specs in,
the results out); :func:`choice_results` takes the model, its tokenizer and the task sets (data/choices.py) and returns
``{"tasks": {name: {"acc", "acc_norm", "n"}}, "mean": {"acc", "acc_norm"}}`` (tasks/choices.py scores them as
lm-eval-harness does). :func:`choices_metric` binds the sets and the tokenizer once, for the sweep's per-setting
extra metrics.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import torch
from torch import nn

from varprune.data.base import DatasetError
from varprune.data.choices import ChoiceSet, load_choice_sets
from varprune.errors import RunError
from varprune.tasks.choices import choice_accuracy

# tokens lm-eval would put before an empty context (its end-of-text token), by the names tokenizers give them
PREFIX_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<s>", "<|begin_of_text|>", "<bos>")


NOT_LANGUAGE_MODELS = ("classification", "segmentation", "text-classification")  # tasks --choices cannot score


def choices_task_problem(what: str, task: str | None) -> str | None:
    """Why ``--choices`` cannot score ``what`` (a run or dataset of ``task``): not a causal language model."""
    if task in NOT_LANGUAGE_MODELS:
        return f"--choices and --lm-eval score a language model's continuations; {what} is a {task} run"
    return None


def prefix_token(tokenizer) -> int | None:
    """The id scored before an empty context, if the tokenizer has such a token (a trained BPE has none)."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    for name in PREFIX_TOKENS:
        found = inner.token_to_id(name) if hasattr(inner, "token_to_id") else None
        if found is not None:
            return int(found)
    return None


def sets_digest(sets: Sequence[ChoiceSet]) -> dict[str, str]:
    """Each set's sha256 over its questions (what prune.json records, so that changed questions are re-swept)."""
    out = {}
    for s in sets:
        body = json.dumps([[i.context, i.choices, i.label] for i in s.items], ensure_ascii=False)
        out[s.name] = hashlib.sha256(body.encode()).hexdigest()
    return out


def choice_results(
    model: nn.Module,
    tokenizer,
    sets: Sequence[ChoiceSet],
    max_length: int,
    device: torch.device | str | None = None,
    amp: str = "none",
) -> dict:
    """Accuracy of ``model`` on every set (see the module docstring); ``max_length``: the model's positions."""
    if tokenizer is None:
        raise RunError("--choices needs a language model with its tokenizer; this run is not a text run")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    return choice_accuracy(model, tokenizer.encode, sets, max_length, dev, amp, prefix_token(tokenizer))


def choices_metric(specs: Sequence[str], tokenizer, max_length: int, amp: str = "none") -> Callable[[nn.Module], dict]:
    """``model -> choice_results(...)`` with the sets read once (the sweep calls it at every setting)."""
    sets = load_choice_sets(specs)

    def measure(model: nn.Module) -> dict:
        return choice_results(model, tokenizer, sets, max_length, amp=amp)

    return measure


def model_positions(model: nn.Module, default: int | None = None) -> int:
    """How many positions ``model`` reads: its configuration's ``n_positions`` / ``max_position_embeddings``
    (transformers' names), else ``default`` (a run's --seq-len); a model that names none is scored as lm-eval
    scores it, 2048 tokens at most."""
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default if default is not None else 2048


def choice_problem(specs: Sequence[str]) -> str | None:
    """The first problem of a ``--choices`` list (every file read and checked), or None: what commands check
    before any work."""
    try:
        load_choice_sets(specs)
    except DatasetError as e:
        return str(e)
    return None


def score_choices(
    model: nn.Module,
    tokenizer,
    specs: Sequence[str] | Sequence[ChoiceSet],
    device: torch.device | str | None = None,
    max_length: int | None = None,
    amp: str = "none",
) -> dict:
    """Multiple-choice accuracy of ``model`` (any causal LM in memory: a run's, an exported file's, a Hugging
    Face folder's) on the ``--choices`` files or ``fortunes-endings`` named by ``specs`` (or sets already read):
    ``{"tasks": {name: {"acc", "acc_norm", "n"}}, "mean": {"acc", "acc_norm"}}``. ``max_length``: the positions
    the model reads (default: :func:`model_positions`)."""
    given = [s for s in specs if isinstance(s, ChoiceSet)]
    sets = given if len(given) == len(specs) else load_choice_sets([str(s) for s in specs])
    positions = max_length if max_length is not None else model_positions(model)
    return choice_results(model, tokenizer, sets, positions, device, amp)
