"""What a text run is made of: its corpus tokenized on the device, its tokenizer, its loaders and model sizes.

The tokenizer is the run's: trained on the training split (``--vocab-size``, a byte-level BPE) or, for a
``--model hf:DIR``, the folder's own; training saves it in the run folder as ``tokenizer.json`` and every
later command on the run (prune, evaluate, export, finetune, analyze) reads it from there, so a token means
the same thing to all of them. For text, ``--limit-train`` and ``--limit-test`` count windows of ``--seq-len``
tokens (language modeling) or examples (classification); ``tune``'s validation is the corpus's valid split.
"""

from __future__ import annotations

from pathlib import Path

import torch

from varprune.data import TextTokenizer, load_dataset, load_tokenizer, text_loader, tokenize, train_tokenizer
from varprune.engine.config import TrainConfig
from varprune.errors import RunError
from varprune.tasks import task_for

TOKENIZER = "tokenizer.json"
_VALID = {"language-modeling": "valid.txt", "text-classification": "valid.jsonl", "instruction-tuning": "valid.json(l)"}


def is_text_task(task: str) -> bool:
    return task in ("language-modeling", "text-classification", "instruction-tuning")


def run_tokenizer(
    cfg: TrainConfig, corpus=None, run: Path | None = None, given: TextTokenizer | None = None
) -> TextTokenizer:
    """The run's tokenizer: ``given`` (an exported model's), ``run``'s tokenizer.json when the run exists, else a
    ``--model hf:DIR`` folder's, else one trained on ``corpus``'s training split."""
    if given is not None:
        return given
    if run is not None and (Path(run) / TOKENIZER).is_file():
        return load_tokenizer(Path(run) / TOKENIZER)
    if run is not None:
        raise RunError(f"{run} has no {TOKENIZER}: a text run keeps its tokenizer there; retrain the run")
    if cfg.model.startswith("hf:"):
        return load_tokenizer(cfg.model[3:])
    if corpus is None:
        raise RunError("a tokenizer needs the corpus it is trained on")
    return train_tokenizer(corpus, cfg.vocab_size)


def epoch_problem(cfg: TrainConfig, data) -> str | None:
    """A language model's epoch draws ``--limit-train`` windows with replacement from the training text's start
    offsets (data.tokens): more windows than the text has offsets repeats each several times an epoch, and a
    number typed with a few zeros too many would run for days. One line naming the most it may be, or None."""
    stream = data.streams.get("train") if data.streams else None
    if stream is None or cfg.limit_train is None:
        return None
    offsets = max(len(stream) - cfg.seq_len + 1, 1)
    if cfg.limit_train <= offsets:
        return None
    steps = -(-cfg.limit_train // cfg.batch_size)
    return (
        f"--limit-train {cfg.limit_train:,}: {data.files['train']} has {offsets:,} windows of --seq-len "
        f"{cfg.seq_len} (one per starting token), drawn with replacement, so an epoch of {cfg.limit_train:,} "
        f"({steps:,} steps) would repeat each about {cfg.limit_train / offsets:,.0f} times; use at most "
        f"--limit-train {offsets} and more --epochs"
    )


def truncation_note(data) -> str | None:
    """Instruction runs: one line saying how many examples of each split were cut at --seq-len (else None)."""
    if not getattr(data, "instructions", None):
        return None
    counts = ", ".join(f"{split} {ex.truncated} of {len(ex)}" for split, ex in data.instructions.items())
    return f"instruction examples longer than --seq-len/--max-length {data.max_length}, cut on the right: {counts}"


def model_sizes(cfg: TrainConfig, info, tokenizer: TextTokenizer) -> dict:
    """The keyword sizes a text model is built with (models.hf): vocabulary, positions, labels, padding."""
    sizes = {"vocab_size": tokenizer.vocab_size, "max_positions": cfg.seq_len}
    if tokenizer.pad_id is not None:
        sizes["pad_token_id"] = tokenizer.pad_id
    eos = getattr(tokenizer, "eos_id", None)  # a stand-in of the sizes alone (commands/common.py) has none
    if info.task == "instruction-tuning" and eos is not None:  # generation stops where the examples end
        sizes["eos_token_id"] = eos
    if cfg.model.startswith("hf:"):
        sizes["task"] = info.task
    return sizes


def load_text_data(
    cfg: TrainConfig,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    run: Path | None = None,
    tokenizer: TextTokenizer | None = None,
):
    """A text run's data on ``device`` (see the module docstring); ``run``: an existing run whose tokenizer is
    used. Returns ``(tokenized data, task, training loader, test loader, tokenizer)``."""
    tuning = cfg.validation_fraction is not None
    corpus = load_dataset(cfg.dataset, cfg.data_dir, need_test=not tuning)
    tokenizer = run_tokenizer(cfg, corpus, run, tokenizer)
    data = tokenize(corpus, tokenizer, device="cpu", max_length=cfg.seq_len)
    test_split = "test"
    if tuning:  # never the test split: the corpus's own validation split
        if "valid" not in data.files:
            raise RunError(
                f"{cfg.dataset} has no validation split ({_VALID[data.task]} "
                f"in the data folder); tuning never measures on the test split"
            )
        test_split = "valid"
    task = task_for(data.info)
    train_loader = text_loader(
        data,
        "train",
        cfg.batch_size,
        True,
        seed=cfg.seed,
        seq_len=cfg.seq_len,
        limit=cfg.limit_train,
        rank=rank,
        world=world,
        device=device,
    )
    test_loader = text_loader(
        data,
        test_split,
        cfg.batch_size,
        False,
        seq_len=cfg.seq_len,
        limit=cfg.limit_test,
        rank=rank,
        world=world,
        device=device,
    )
    if len(train_loader) == 0:
        raise RunError(f"{cfg.dataset} gives no training batch here: raise --limit-train or lower --batch-size")
    return data, task, train_loader, test_loader, tokenizer


def vocabulary_note(cfg: TrainConfig, tokenizer: TextTokenizer | None, resumed: bool = False) -> str | None:
    """A line saying that the byte-level BPE trained here stopped short of --vocab-size (a merge needs two
    occurrences in the training split, so a small text runs out of merges); None when it did not, or when the
    tokenizer was not trained in this run (``resumed``: its own or its source run's; a --model hf:DIR's)."""
    if tokenizer is None or resumed or cfg.model.startswith("hf:") or tokenizer.vocab_size >= cfg.vocab_size:
        return None
    return (
        f"note: the tokenizer has {tokenizer.vocab_size:,} tokens, not the {cfg.vocab_size:,} of --vocab-size: the "
        f"training text has no more merges (config.json records both)"
    )
