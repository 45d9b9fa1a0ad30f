"""The optional libraries a model or a dataset needs, checked before anything is read or trained: a missing one is
one line naming the install, never a traceback halfway through a run (engine.checks calls it)."""

from __future__ import annotations

import importlib.util
import sys

HF_MODELS = ("gpt2", "llama", "bert")  # models/hf.py's, built by transformers; so is every hf:DIR


def installed(module: str) -> bool:
    """Can ``module`` be imported here? Found without importing it (transformers takes seconds)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def library_problem(model: str, text: bool) -> str | None:
    """What a run of ``model`` (on a text dataset if ``text``: its byte-level BPE needs tokenizers) needs that is
    not installed, in one line naming the install; None when nothing is missing."""
    needs = []
    if (model in HF_MODELS or model.startswith("hf:")) and not installed("transformers"):
        needs.append("transformers")
    if text and not installed("tokenizers"):
        needs.append("tokenizers")
    if not needs:
        return None
    what = f"--model {model}" if "transformers" in needs else "a text dataset"
    return f"{what} needs Hugging Face {' and '.join(needs)}, not installed: pip install 'varprune[hf]'"
