"""Multiple-choice accuracy (``--choices``) of any language model in memory: one function that every command
calls (evaluate, prune's sweep, study), whatever the model came from (a run, an exported file, a folder).

:func:`choice_results` takes the model, its tokenizer and the task sets (data/choices.py) and returns
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

from varprune.data.choices import ChoiceSet, load_choice_sets
from varprune.errors import RunError
from varprune.tasks.choices import choice_accuracy

# tokens lm-eval would put before an empty context (its end-of-text token), by the names tokenizers give them
PREFIX_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<s>", "<|begin_of_text|>", "<bos>")


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
