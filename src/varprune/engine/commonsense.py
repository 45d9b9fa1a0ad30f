"""Commonsense-reasoning accuracy as LLM-Adapters measures it: ``varprune evaluate ... --commonsense DIR``.

For each task of ``DIR`` (data/commonsense.py: ``DIR/<task>/test.json``, records with ``instruction`` and
``answer``), every instruction becomes the Alpaca prompt without input (data/instructions.py), encoded without
special tokens, and the model continues it greedily for at most :data:`MAX_NEW_TOKENS` tokens, in batches left-padded
to their longest prompt (tasks/generation.py). The continuation is decoded without special tokens, the task's rule
extracts the answer (the first match, none = wrong) and it is right when it equals the record's ``answer``. The
result is each task's accuracy and the unweighted average over the tasks, the paper's table's columns.

:func:`commonsense_accuracy` takes any causal LM in memory and its tokenizer (an exported model, a run's final
weights, a pretrained folder); :func:`load_for_generation` loads the first two.
"""

from __future__ import annotations

import json
from pathlib import Path

from varprune.data.base import DatasetError
from varprune.data.commonsense import read_commonsense
from varprune.data.instructions import alpaca_prompt
from varprune.device import resolve_amp, resolve_device
from varprune.errors import RunError
from varprune.tasks.generation import extract_answer, greedy_generate

__all__ = ["MAX_NEW_TOKENS", "commonsense_accuracy", "format_commonsense", "load_for_generation"]

MAX_NEW_TOKENS = 32  # LLM-Adapters' commonsense_evaluate.py
_CAUSAL = ("language-modeling", "instruction-tuning")


def _positions(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def commonsense_accuracy(
    model,
    tokenizer,
    folder,
    device=None,
    amp: str = "none",
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
    log=None,
) -> dict:
    """``{"tasks": {task: {"accuracy", "correct", "n"}}, "average": mean accuracy over the tasks}`` of ``model``
    (a transformers causal LM) with ``tokenizer`` (a TextTokenizer) on the test sets under ``folder`` (module
    docstring). Every set is read and every prompt checked before anything is generated."""
    sets = read_commonsense(folder)
    eos = tokenizer.eos_id
    if eos is None:
        raise DatasetError(
            f"tokenizer {tokenizer.source} has no end-of-sequence token; generation needs one to stop at"
        )
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
    limit = _positions(model)
    prompts = []
    for s in sets:
        ids = tokenizer.encode_pieces([alpaca_prompt(q) for q in s.instructions])
        for i, one in enumerate(ids):
            if limit is not None and len(one) + max_new_tokens > limit:
                raise DatasetError(
                    f"{s.where(i)}: its prompt is {len(one)} tokens and {max_new_tokens} new ones would follow, "
                    f"beyond the model's {limit} positions; shorten the record or use a model of longer context"
                )
        prompts.append(ids)
    tasks = {}
    for s, ids in zip(sets, prompts):
        outputs = greedy_generate(model, ids, eos, pad, max_new_tokens, batch_size, device, amp)
        predicted = [extract_answer(s.task, tokenizer.decode(o, skip_special=True)) for o in outputs]
        correct = sum(p == a for p, a in zip(predicted, s.answers))
        tasks[s.task] = {"accuracy": correct / len(s), "correct": correct, "n": len(s)}
        if log is not None:
            log(f"  {s.task}: {100 * correct / len(s):.2f}% of {len(s)}")
    return {"tasks": tasks, "average": sum(t["accuracy"] for t in tasks.values()) / len(tasks)}


def format_commonsense(result: dict) -> str:
    """The accuracies as a one-row Markdown table (percent), tasks in order, the average last."""
    names = list(result["tasks"])
    head = "| " + " | ".join([*names, "average"]) + " |"
    rule = "|" + "---:|" * (len(names) + 1)
    row = "| " + " | ".join(f"{100 * result['tasks'][n]['accuracy']:.2f}" for n in names)
    return "\n".join([head, rule, row + f" | {100 * result['average']:.2f} |"])


def load_for_generation(path: Path | str, device="auto"):
    """``(model, tokenizer, device, amp)`` of an exported file (``varprune export``), of a run folder's final
    weights, or of ``hf:DIR`` (a Hugging Face causal-LM folder and its tokenizer.json); one-line errors for
    anything else."""
    from varprune.data.tokenizer import load_tokenizer, tokenizer_from_json
    from varprune.storage.pruned_format import load_pruned, read_pruned_metadata

    dev = resolve_device(device)
    if str(path).startswith("hf:"):  # a Hugging Face folder as it is, held in bf16 on a GPU
        from varprune.models import create_model

        folder = Path(str(path)[3:])
        tokenizer = load_tokenizer(folder)
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
        model = create_model(f"hf:{folder}", task=_CAUSAL[0], vocab_size=tokenizer.vocab_size, dtype=dtype)
        return model.to(dev).eval(), tokenizer, dev, "none"
    path = Path(path)
    if path.is_dir():
        from varprune.data import DATASETS
        from varprune.engine.runconfig import load_run_config
        from varprune.engine.rundir import TOKENIZER, WEIGHTS
        from varprune.engine.runs import build_model
        from varprune.storage.checkpoint import load_weights

        cfg = load_run_config(path)
        if DATASETS[cfg.dataset].task not in _CAUSAL:
            raise RunError(f"{path} is a {DATASETS[cfg.dataset].task} run; commonsense accuracy needs a causal LM")
        if not (path / WEIGHTS).is_file() or not (path / TOKENIZER).is_file():
            raise RunError(f"{path} has no final {WEIGHTS} and {TOKENIZER}; give a finished text run")
        tokenizer = load_tokenizer(path / TOKENIZER)
        model = build_model(cfg, DATASETS[cfg.dataset], dev, tokenizer=tokenizer)
        load_weights(path / WEIGHTS, model, expect={"model": cfg.model, "dataset": cfg.dataset})
        return model.eval(), tokenizer, dev, resolve_amp(cfg.amp, dev)
    meta = read_pruned_metadata(path)
    task = meta.get("dataset", {}).get("task") if isinstance(meta.get("dataset"), dict) else None
    if "tokenizer_json" not in meta or task not in _CAUSAL:
        raise RunError(f"{path} is not a text model (it carries no tokenizer); commonsense accuracy needs a causal LM")
    tokenizer = tokenizer_from_json(meta["tokenizer_json"], json.loads(meta.get("tokenizer_pad_id", "null")), str(path))
    try:
        amp = json.loads(meta["train_config"]).get("amp", "auto")
    except (KeyError, ValueError, AttributeError):
        amp = "auto"
    return load_pruned(path, dev), tokenizer, dev, resolve_amp(amp if isinstance(amp, str) else "auto", dev)
