"""Multiple-choice task files (``--choices``): reading them strictly, converting the public formats, and the
offline task ``fortunes-endings``.

The file format, one JSON object a line (blank lines skipped)::

    {"context": "Question: Is the sky blue?\\nAnswer: ", "choices": ["no", "yes"], "label": 1}

``context`` is a string; ``choices`` two or more strings; ``label`` the index of the right one. A choice is
scored as the continuation of the context (tasks/choices.py); the whitespace that separates them ends the context
(lm-eval's ``target_delimiter``, one space), and the scorer moves it to the continuation as lm-eval does, so the
tokens are lm-eval's and a choice's length (``acc_norm``) counts its own characters only, as lm-eval's does.
``context`` may also be a list of strings, one per choice, with a shared continuation: lm-eval's "multiple
inputs" form, which WinoGrande's partial evaluation needs (each option completes the sentence up to the blank,
and the rest of the sentence is scored).

:func:`convert_rows` turns the published rows of BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC and OpenBookQA
into this format, following lm-eval-harness's prompt for each task (its ``doc_to_text``, ``doc_to_choice`` and
``doc_to_target``, and its default ``target_delimiter`` of one space before every choice); see :data:`FORMATS`.

:func:`fortunes_endings` builds ``fortunes-endings``, a HellaSwag-style set from the fortunes test split
(data/text.py), so that the CPU demos can report an accuracy without downloading anything.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from varprune.data.base import DatasetError
from varprune.data.text import DEBIAN_FORTUNES, _read_fortunes, read_text, split_of

__all__ = [
    "FORMATS",
    "FORTUNES_ENDINGS",
    "ChoiceItem",
    "ChoiceSet",
    "convert_file",
    "convert_rows",
    "fortunes_endings",
    "load_choice_sets",
    "read_choices",
]

FORTUNES_ENDINGS = "fortunes-endings"
ENDINGS_SEED = 20_251_207  # fortunes-endings: which other quotations' endings are the distractors, and the order
ENDINGS_CHOICES = 4
ENDINGS_MIN_WORDS = 4  # a quotation of fewer words has no halves worth guessing
ENDINGS_MAX_WORDS = 32  # longer ones are left out: a half must fit a small model's positions


@dataclass(frozen=True)
class ChoiceItem:
    """One question: its context (or one context per choice), its choices and the index of the right one."""

    context: str | tuple[str, ...]
    choices: tuple[str, ...]
    label: int

    def requests(self) -> list[tuple[str, str]]:
        """``(context, continuation)`` per choice, as they are scored."""
        if isinstance(self.context, str):
            return [(self.context, c) for c in self.choices]
        return list(zip(self.context, self.choices))


@dataclass(frozen=True)
class ChoiceSet:
    """A task: its name (the file's stem, or ``fortunes-endings``), where it came from and its questions."""

    name: str
    source: str
    items: tuple[ChoiceItem, ...]


def _kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _item(obj, where: str) -> ChoiceItem:
    """One line's object, checked; every problem names ``where`` (file and line)."""
    shape = '{"context": str, "choices": [str, ...], "label": int}'
    if not isinstance(obj, dict):
        raise DatasetError(f"{where} is a JSON {_kind(obj)}, not an object {shape}")
    for field in ("context", "choices", "label"):
        if field not in obj:
            raise DatasetError(f"{where} lacks the field {field!r}; every line is {shape}")
    context, choices, label = obj["context"], obj["choices"], obj["label"]
    if not isinstance(choices, list) or len(choices) < 2:
        got = f"{len(choices)} choice(s)" if isinstance(choices, list) else f"a JSON {_kind(choices)}"
        raise DatasetError(f"{where}: 'choices' must be a list of two or more strings, got {got}")
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise DatasetError(f"{where}: choice {i} is a JSON {_kind(c)}, not a string")
        if not c:
            raise DatasetError(f"{where}: choice {i} is empty; a choice needs at least one character")
    if isinstance(context, list):
        if len(context) != len(choices) or not all(isinstance(c, str) for c in context):
            raise DatasetError(
                f"{where}: a list 'context' must hold one string per choice ({len(choices)}), got "
                f"{len(context)} item(s)"
            )
        context = tuple(context)
    elif not isinstance(context, str):
        raise DatasetError(f"{where}: 'context' is a JSON {_kind(context)}, not a string")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DatasetError(f"{where}: 'label' is a JSON {_kind(label)}; give the right choice's index (an integer)")
    if not 0 <= label < len(choices):
        raise DatasetError(f"{where}: label {label} is outside the {len(choices)} choices (0 to {len(choices) - 1})")
    return ChoiceItem(context, tuple(choices), label)


def _json_lines(path: Path) -> Iterable[tuple[str, object]]:
    """``(where, object)`` for every non-blank line of a JSON-lines file; a line that is not JSON is refused."""
    text, _ = read_text(path)
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            yield where, json.loads(line)
        except ValueError as e:
            raise DatasetError(
                f"{where} is not JSON ({getattr(e, 'msg', None) or e}); the file must be JSON lines, one object a line"
            ) from None


def read_choices(path: str | os.PathLike) -> ChoiceSet:
    """A ``--choices`` file, every line checked (see the module docstring); named by the file's stem."""
    path = Path(path)
    items = tuple(_item(obj, where) for where, obj in _json_lines(path))
    if not items:
        raise DatasetError(f"{path} holds no question (only blank lines); it needs one JSON object a line")
    return ChoiceSet(path.stem, str(path), items)


def load_choice_sets(specs: Iterable[str], fortunes_dir: str | None = None) -> list[ChoiceSet]:
    """The sets a ``--choices`` list names: files, and ``fortunes-endings`` (built from ``fortunes_dir``, by
    default $VARPRUNE_FORTUNES or Debian's fortunes). Two sets of one name are refused (their results would
    collide)."""
    sets = []
    for spec in specs:
        if spec == FORTUNES_ENDINGS:
            sets.append(fortunes_endings(fortunes_dir or os.environ.get("VARPRUNE_FORTUNES", DEBIAN_FORTUNES)))
        elif not Path(spec).is_file():
            raise DatasetError(
                f"--choices {spec} is not a file; give JSON-lines files of questions or {FORTUNES_ENDINGS}"
            )
        else:
            sets.append(read_choices(spec))
    names = [s.name for s in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DatasetError(f"--choices names the task {twice[0]!r} twice (tasks are named by file stem); rename one")
    return sets


# ----------------------------------------------------------------- fortunes-endings


def _halves(entry: str) -> tuple[str, str] | None:
    """A quotation cut at the word boundary nearest its middle character: ``(first half, second half)``, the
    whitespace between them ending the first (the scorer moves it to the continuation, as lm-eval does)."""
    gaps = [(m.start(), m.end()) for m in re.finditer(r"\s+", entry)]
    if not ENDINGS_MIN_WORDS <= len(gaps) + 1 <= ENDINGS_MAX_WORDS:
        return None
    _, end = min(gaps, key=lambda g: (abs(g[0] - len(entry) / 2), g[0]))
    return entry[:end], entry[end:]


def fortunes_endings(root: str | os.PathLike, seed: int = ENDINGS_SEED) -> ChoiceSet:
    """``fortunes-endings``: for every quotation of the fortunes test split (data/text.py's split, every distinct
    entry in file order) of 4 to 32 words, the context is its first half (cut at the word boundary nearest
    the middle character) and the choices are its true second half and the second halves of three other test
    quotations, drawn with ``seed``; the true one's place is drawn too. A fixed set for a fixed folder."""
    topics = _read_fortunes(Path(root))
    entries = list(dict.fromkeys(e for topic in topics.values() for e in topic))
    pairs = [h for e in entries if split_of(e) == "test" and (h := _halves(e)) is not None]
    if len(pairs) < ENDINGS_CHOICES:
        raise DatasetError(
            f"{root}: {len(pairs)} test quotations of {ENDINGS_MIN_WORDS} to {ENDINGS_MAX_WORDS} words; "
            f"fortunes-endings needs {ENDINGS_CHOICES}"
        )
    rng = random.Random(seed)
    items = []
    for i, (context, ending) in enumerate(pairs):
        others: list[str] = []
        while len(others) < ENDINGS_CHOICES - 1:
            j = rng.randrange(len(pairs))
            if j != i and pairs[j][1] != ending and pairs[j][1] not in others:
                others.append(pairs[j][1])
        label = rng.randrange(ENDINGS_CHOICES)
        choices = others[:label] + [ending] + others[label:]
        items.append(ChoiceItem(context, tuple(choices), label))
    return ChoiceSet(FORTUNES_ENDINGS, f"{root} (test split)", tuple(items))


# ----------------------------------------------------------------- the public formats


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``: strip, `` [title]`` to ``. ``, bracketed tags dropped, double spaces
    made single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _boolq(row) -> dict:
    label = row["label"] if "label" in row else row["answer"]  # super_glue's 0/1, or google/boolq's true/false
    return {
        "context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer: ",
        "choices": ["no", "yes"],
        "label": int(bool(label)),
    }


def _piqa(row) -> dict:
    return {
        "context": f"Question: {row['goal']}\nAnswer: ",
        "choices": [row["sol1"], row["sol2"]],
        "label": int(row["label"]),
    }


def _siqa(row) -> dict:
    return {
        "context": f"Q: {row['context']} {row['question']}\nA: ",
        "choices": [row[k] for k in ("answerA", "answerB", "answerC")],
        "label": int(row["label"]) - 1,  # "1".."3"
    }


def _hellaswag(row) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "context": _hellaswag_clean(row["activity_label"] + ": " + ctx) + " ",
        "choices": [_hellaswag_clean(e) for e in row["endings"]],
        "label": int(row["label"]),
    }


def _winogrande(row) -> dict:
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = sentence[blank + 1 :].strip()
    options = [row["option1"], row["option2"]]
    return {
        "context": [sentence[:blank] + o + " " for o in options],
        "choices": [rest, rest],
        "label": {"1": 0, "2": 1}[str(row["answer"])],
    }


def _lettered(question: str) -> Callable[[dict], dict]:
    """ARC (``question``, ``Question: ...\\nAnswer:``) and OpenBookQA (``question_stem``, as it is): the choices'
    texts, the label the answer key's place among the choices' labels."""

    def convert(row) -> dict:
        text = row[question]
        return {
            "context": (f"Question: {text}\nAnswer:" if question == "question" else text) + " ",
            "choices": list(row["choices"]["text"]),
            "label": list(row["choices"]["label"]).index(str(row["answerKey"]).strip()),
        }

    return convert


FORMATS: dict[str, Callable[[dict], dict]] = {
    "boolq": _boolq,  # super_glue/boolq: "{passage}\nQuestion: {question}?\nAnswer:", choices no/yes
    "piqa": _piqa,  # "Question: {goal}\nAnswer:", choices sol1/sol2
    "siqa": _siqa,  # "Q: {context} {question}\nA:", choices answerA..C, label "1".."3"
    "hellaswag": _hellaswag,  # "{activity_label}: {ctx_a} {ctx_b capitalised}", cleaned; choices the endings
    "winogrande": _winogrande,  # partial evaluation: sentence up to the blank + option; the rest is scored
    "arc": _lettered("question"),  # ARC-Easy and ARC-Challenge: "Question: {question}\nAnswer:"
    "openbookqa": _lettered("question_stem"),  # "{question_stem}"
}


def convert_rows(fmt: str, rows: Iterable[tuple[str, object]]) -> list[dict]:
    """Each ``(where, published row)`` in the format of ``--choices`` (checked as :func:`read_choices` checks a
    line); a row without the format's fields names ``where``."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{where} is a JSON {_kind(row)}, not an object (a {fmt} row)")
        try:
            doc = FORMATS[fmt](row)
        except KeyError as e:
            raise DatasetError(f"{where} lacks the field {e.args[0]!r} of a {fmt} row") from None
        except (ValueError, TypeError, AttributeError) as e:
            raise DatasetError(f"{where} is not a {fmt} row ({type(e).__name__}: {e})") from None
        _item(doc, where)
        out.append(doc)
    return out


def _rows(path: Path) -> list[tuple[str, object]]:
    """A published file's rows: a JSON list (``where`` is the row's index) or JSON lines."""
    text, _ = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            msg = getattr(e, "msg", None) or e
            raise DatasetError(f"{path} is not JSON ({msg}); give JSON lines or a JSON list") from None
        return [(f"{path} row {i}", r) for i, r in enumerate(rows)]
    return list(_json_lines(path))


def convert_file(fmt: str, src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Convert the file ``src`` (JSON lines or a JSON list of ``fmt``'s published rows) to the ``--choices``
    file ``dst`` (written atomically, only once every row converted); returns the number of questions."""
    from varprune.storage.files import atomic_write_text

    docs = convert_rows(fmt, _rows(Path(src)))
    if not docs:
        raise DatasetError(f"{src} holds no rows")
    atomic_write_text(Path(dst), "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return len(docs)
