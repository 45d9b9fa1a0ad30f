"""The instruction family: instruction / input / output records for supervised fine-tuning of a causal LM.

``instructions``: ``DIR/train.json`` or ``DIR/train.jsonl``, ``DIR/test.json(l)``, optional ``DIR/valid.json(l)``.
A file is a JSON list of records (the Alpaca and LLM-Adapters files as they come, such as
``commonsense_170k.json``) or JSON lines, one record a line; which one is read from its first character (``[``:
a list), not from its name. A record is an object with a string ``instruction``, an optional string ``input``
and a string ``output``; any other field (LLM-Adapters' ``answer``) is ignored.

Every record becomes the Alpaca prompt that those projects train with (:data:`PROMPT_WITH_INPUT` when
``input`` is a non-empty string, else :data:`PROMPT_NO_INPUT`, character for character as in
tatsu-lab/stanford_alpaca and AGI-Edgerunners/LLM-Adapters) and the response, the ``output`` as it is. The
tokenizer's end-of-sequence token follows the response when it is encoded (data/instructtokens.py), and only the
response's tokens carry loss.

Readers are strict, as the text family's: a file that is not UTF-8, empty or not a regular file, a list or line
that is not JSON, a record that is not an object, lacks ``instruction`` or ``output``, or holds a field that is
not a string is a one-line :class:`DatasetError` naming the file, the record's number and its line. Nothing is
downloaded and nothing is written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from varprune.data.base import DatasetError, DatasetInfo, DatasetLocation
from varprune.data.identity import file_sha256
from varprune.data.text import JSONL_MEMORY_FACTOR, TextCorpus, _entry_kind, _json_type, decode_utf8, read_bytes

__all__ = [
    "DATASETS",
    "PROMPT_NO_INPUT",
    "PROMPT_WITH_INPUT",
    "TASK",
    "InstructionSplit",
    "alpaca_prompt",
    "default_dir",
    "load",
    "locate",
    "parse_records",
    "read_instructions",
]

TASK = "instruction-tuning"
SPLITS = ("train", "valid", "test")
SUFFIXES = (".json", ".jsonl")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_LAYOUT = (
    "DIR/train.json(l) and DIR/test.json(l) (optional DIR/valid.json(l)): a JSON list or JSON lines of "
    'records {"instruction": ..., "input": ..., "output": ...}'
)
DATASETS = {"instructions": DatasetInfo("instructions", 0, 0, 0, (), (), 0, False, _LAYOUT, task=TASK)}


def alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The Alpaca prompt of a record: with the input when it is a non-empty string, else without."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass
class InstructionSplit:
    """One split: ``prompts`` and ``responses`` (the records' outputs), and for messages each record's line in
    ``file``. ``num_bytes`` is the file's size, ``sha256`` its digest. ``text`` is None (not a token stream)
    and :attr:`texts` are the prompts followed by their responses (what a tokenizer is trained on)."""

    name: str
    file: str
    num_bytes: int
    prompts: list[str]
    responses: list[str]
    lines: list[int] = field(default_factory=list)
    text: None = None
    needs_eos: bool = True  # a tokenizer trained on it gets an end-of-sequence token (data/tokenizer.py)
    sha256: str | None = None  # of the file's bytes (data/identity.py)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p + r for p, r in zip(self.prompts, self.responses)]

    def where(self, i: int) -> str:
        """Record ``i`` (from 0) as messages name it: ``FILE record N (line L)``."""
        line = f" (line {self.lines[i]})" if i < len(self.lines) else ""
        return f"{self.file} record {i + 1}{line}"


def default_dir(name: str) -> str:
    return os.environ.get("VARPRUNE_DATA", "data")


# ----------------------------------------------------------------- reading


def _json_list(text: str, path: Path):
    """``(object, line)`` of each element of a JSON list, parsed one element at a time so that each record's
    line is known; anything but a list of values is a DatasetError naming the line."""
    decoder = json.JSONDecoder()
    n = len(text)
    counted, line = 0, 1

    def line_at(pos: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def skip(pos: int) -> int:
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip(text.index("[") + 1)
    if pos < n and text[pos] == "]":
        pos = skip(pos + 1)
    else:
        while True:
            at = line_at(pos)
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except ValueError as e:
                reason = getattr(e, "msg", None) or str(e)
                raise DatasetError(f"{path} line {line_at(min(pos, n))} is not JSON ({reason}); fix the file") from None
            yield obj, at
            pos = skip(pos)
            if pos < n and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < n and text[pos] == "]":
                pos = skip(pos + 1)
                break
            raise DatasetError(
                f"{path} line {line_at(min(pos, n))}: expected ',' or ']' after a record in the JSON list; fix the file"
            )
    if pos < n:
        raise DatasetError(f"{path} line {line_at(pos)}: text after the JSON list's closing ']'; remove it")


def _json_lines(text: str, path: Path, shape: str):
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), number
        except ValueError as e:
            reason = getattr(e, "msg", None) or str(e)
            raise DatasetError(
                f"{path} line {number} is not JSON ({reason}); a JSON-lines file holds one record a line "
                f"{shape}, a .json file may hold one JSON list of them"
            ) from None


def parse_records(path: str | os.PathLike, shape: str):
    """``(record, line, where)`` for each record of a JSON list or JSON-lines file (read from its first
    character), ``where`` naming the file, record and line for messages; a record that is not an object is a
    one-line DatasetError (``shape`` shows what one looks like)."""
    path = Path(path)
    text = decode_utf8(read_bytes(path, JSONL_MEMORY_FACTOR), path)
    records = _json_list(text, path) if text.lstrip().startswith("[") else _json_lines(text, path, shape)
    for number, (obj, line) in enumerate(records, 1):
        where = f"{path} record {number} (line {line})"
        if not isinstance(obj, dict):
            raise DatasetError(f"{where} is a JSON {_json_type(obj)}, not an object {shape}")
        yield obj, line, where


def read_instructions(path: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """The prompts, responses and line numbers of an instruction file (a JSON list or JSON lines; see the module
    docstring). Any bad record is a one-line DatasetError naming the file, the record and its line."""
    path = Path(path)
    prompts: list[str] = []
    responses: list[str] = []
    lines: list[int] = []
    for obj, line, where in parse_records(path, '{"instruction": ..., "output": ...}'):
        for key in ("instruction", "output"):
            if key not in obj:
                raise DatasetError(f"{where} lacks the field {key!r}; every record needs 'instruction' and 'output'")
        for key in ("instruction", "input", "output"):
            if key in obj and not isinstance(obj[key], str) and not (key == "input" and obj[key] is None):
                raise DatasetError(f"{where}: {key!r} is a JSON {_json_type(obj[key])}, not a string")
        prompts.append(alpaca_prompt(obj["instruction"], obj.get("input")))
        responses.append(obj["output"])
        lines.append(line)
    if not prompts:
        raise DatasetError(f"{path} holds no records; it needs a JSON list or JSON lines of instruction records")
    return prompts, responses, lines


# ----------------------------------------------------------------- the family's entry points


def _files(root: Path, need_test: bool) -> tuple[dict[str, Path], list[str], str | None]:
    """(split -> its file, missing names, a problem such as two files for one split)."""
    files: dict[str, Path] = {}
    missing: list[str] = []
    for split in SPLITS:
        present = [root / f"{split}{s}" for s in SUFFIXES if os.path.lexists(root / f"{split}{s}")]
        if len(present) > 1:
            return files, missing, f"{root} holds both {present[0].name} and {present[1].name}; keep one"
        if present and (split != "test" or need_test):
            files[split] = present[0]
        elif not present and (split == "train" or (split == "test" and need_test)):
            missing.append(f"{split}.json or {split}.jsonl")
    return files, missing, None


def _not_found(root: Path, missing: str) -> str:
    return f"instructions not found in {root} (missing {missing}; expected {_LAYOUT}): point --data-dir at it"


def locate(name: str, root: Path, need_test: bool = True) -> DatasetLocation:
    """Which of the split files exist under ``root`` (names and ``stat`` only; nothing is opened)."""
    root = Path(root)
    found: list[Path] = []
    try:
        files, missing, message = _files(root, need_test)
        for path in files.values():
            kind = _entry_kind(path)
            (found.append(path) if kind is None else missing.append(f"{path.name} ({kind})"))
    except OSError as e:
        found, missing, message = [], [f"{root} ({e.strerror or e})"], None
    if message is not None:
        missing.insert(0, "one file per split")
    elif missing:
        message = _not_found(root, missing[0])
    return DatasetLocation(name, root, found, missing, message)


def load(
    name: str, root: Path, download: bool = False, image_size: int | None = None, need_test: bool = True
) -> TextCorpus:
    """Every split as an :class:`InstructionSplit` in a TextCorpus (``image_size`` is ignored); without
    ``need_test`` no test file is read. Every file is read and checked before any is used."""
    root = Path(root)
    if download:
        raise DatasetError(f"{name}: --download is not supported for instruction data; point --data-dir at a folder")
    files, missing, problem = _files(root, need_test)
    if problem is not None:
        raise DatasetError(problem)
    if missing:
        raise DatasetError(_not_found(root, missing[0]))
    splits = {}
    for split, path in files.items():
        prompts, responses, lines = read_instructions(path)
        splits[split] = InstructionSplit(
            split, str(path), path.stat().st_size, prompts, responses, lines, sha256=file_sha256(path)
        )
    return TextCorpus(DATASETS[name], splits, str(root))  # type: ignore[arg-type]
