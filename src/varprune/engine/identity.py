"""Is this the data a run was trained on? What a run records of its data, and the one check every command that
evaluates or continues a run makes before it measures anything.

A run records (config.json, ``resolved``): the task, the number and names of its classes, the image shape, and
for text the sha256 of every split it read (``text_sha256``, data/identity.py) and of the tokenizer.json it
wrote (``tokenizer.sha256``). :func:`check_same_data` compares them with the data and tokenizer a later command
loaded (prune, export, evaluate, finetune, analyze, ``train --resume``, and the studies through the sweep) and
refuses a difference in one line naming both. An edited or replaced tokenizer.json is always refused (the run
is damaged); other text is accepted only where the command offers ``--other-data`` and it is given: the
difference is then returned, for the command to print and record in what it writes. Runs of older varprune
recorded less: what they did not record is not compared.
"""

from __future__ import annotations

import json

from varprune.errors import RunError

OTHER_DATA = "--other-data"  # the flag (commands/common.py declares it) that accepts other text


def data_identity(info) -> dict:
    """What a run records of its data's shape and classes and checks again whenever it is evaluated or continued."""
    return {
        "task": info.task,
        "input_shape": [info.channels, info.size, info.size],
        "num_classes": info.num_classes,
        "class_names": list(info.class_names),
    }


def recorded_identity(data, tokenizer_json: str | None = None, requested_vocab_size: int | None = None) -> dict:
    """The ``resolved`` entries of a run trained on ``data`` (a RunData): :func:`data_identity`, and for text the
    digests of its splits and the tokenizer (``tokenizer_json``: the text written to RUN/tokenizer.json;
    ``requested_vocab_size``: a --vocab-size the BPE stopped short of, recorded beside the size it reached)."""
    from varprune.data.identity import sha256_hex

    out = data_identity(data.data.info)
    digests = getattr(data.data, "digests", None)
    if digests:
        out["text_sha256"] = dict(digests)
    if data.tokenizer is not None:
        out["tokenizer"] = {
            "vocab_size": data.tokenizer.vocab_size,
            "pad_id": data.tokenizer.pad_id,
            "source": data.tokenizer.source,
            **({"sha256": sha256_hex(tokenizer_json)} if tokenizer_json is not None else {}),
            **({"requested_vocab_size": requested_vocab_size} if requested_vocab_size is not None else {}),
        }
    return out


def _describe(d: dict) -> str:
    names = d.get("class_names") or []
    shown = (": " + ", ".join(map(str, names[:4])) + (", ..." if len(names) > 4 else "")) if names else ""
    shape = d.get("input_shape") or []
    size = f", {shape[0]} channel(s) at {shape[1]}x{shape[2]}" if len(shape) == 3 and shape[0] else ""
    return f"{d.get('num_classes')} classes{shown}{size} ({d.get('task')})"


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _short(digest) -> str:
    return str(digest)[:12]


def check_same_data(
    recorded: dict, data, what: str, data_dir, other_data: bool = False, offered: bool = True
) -> dict | None:
    """Refuse data whose task, classes, class names, channels or image size differ from what ``what`` (a run or an
    exported file) recorded, a tokenizer that is not the one it recorded, and text whose digests differ, unless
    ``other_data`` (``--other-data``; ``offered``: whether the command has the flag, for the message). ``data``: the
    RunData loaded. Returns None when the text is the run's (or nothing was recorded to compare), else what the
    command measures on instead: ``{"text_sha256": {split: digest}, "differs": [split, ...]}``."""
    where = f"--data-dir {data_dir}" if data_dir is not None else "the data folder"
    if "num_classes" in recorded:  # runs of 0.1 recorded less: nothing to compare
        have = data_identity(data.data.info)
        diffs = [
            key
            for key in ("task", "num_classes", "input_shape")
            if recorded.get(key) is not None and _plain(recorded[key]) != _plain(have[key])
        ]
        theirs, ours = recorded.get("class_names") or [], have["class_names"]
        if theirs and ours and list(theirs) != list(ours):
            diffs.append("class_names")
        if diffs:
            raise RunError(
                f"{where} holds {_describe(have)}, but {what} was trained on {_describe(recorded)}; point "
                f"--data-dir at the data it was trained on"
            )
    tokenizer = data.tokenizer
    problem = _tokenizer_problem(recorded, getattr(tokenizer, "source", ""), getattr(tokenizer, "sha256", None), what)
    if problem:
        raise RunError(problem)
    texts = recorded.get("text_sha256")
    have_texts = getattr(data.data, "digests", None) or {}
    if not isinstance(texts, dict) or not have_texts:
        return None
    order = {split: i for i, split in enumerate(("train", "valid", "test"))}  # the first named is the training text
    differs = sorted(
        (split for split, digest in texts.items() if split in have_texts and have_texts[split] != digest),
        key=lambda split: order.get(split, len(order)),
    )
    if not differs:
        return None
    if not other_data:
        split = differs[0]
        more = f" (and {len(differs) - 1} more split(s))" if len(differs) > 1 else ""
        escape = f", or pass {OTHER_DATA} to measure on this text deliberately" if offered else ""
        raise RunError(
            f"{where} holds other text than {what} was trained on: {data.data.files.get(split, split)} "
            f"({split} split) has sha256 {_short(have_texts[split])}, {what} recorded "
            f"{_short(texts[split])}{more}; point --data-dir at the text it was trained on{escape}"
        )
    return {"text_sha256": dict(have_texts), "differs": differs}


def _tokenizer_problem(recorded: dict, source, found: str | None, what: str) -> str | None:
    tokenizer = recorded.get("tokenizer")
    expected = tokenizer.get("sha256") if isinstance(tokenizer, dict) else None
    if not isinstance(expected, str) or found is None or found == expected:
        return None
    return (
        f"{source} is not the tokenizer {what} was trained with (sha256 {_short(found)}, {what} recorded "
        f"{_short(expected)}): it was edited or replaced, so its tokens are not the model's; put the run's own "
        f"tokenizer.json back, or retrain the run"
    )


def run_tokenizer_problem(run, recorded: dict) -> str | None:
    """:func:`check_same_data`'s tokenizer check before anything is loaded (RUN/tokenizer.json's bytes against
    the digest ``recorded`` in its config.json), so that a command over several runs refuses before any work."""
    from pathlib import Path

    from varprune.data.identity import file_sha256

    path = Path(run) / "tokenizer.json"
    try:
        json.loads(path.read_bytes())
        found = file_sha256(path)
    except (OSError, ValueError, RecursionError):
        return None  # missing, unreadable or not JSON: loading it says which, more precisely
    return _tokenizer_problem(recorded, path, found, str(run))


def other_data_line(what: str, other: dict) -> str:
    """The line a command prints when it measures on other text (``--other-data``)."""
    splits = ", ".join(f"{s} sha256 {_short(other['text_sha256'][s])}" for s in other["differs"])
    return f"{OTHER_DATA}: measuring {what} on other text than it was trained on ({splits})"
