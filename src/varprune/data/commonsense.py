"""The commonsense-reasoning test sets of LLM-Adapters, read for generation accuracy (engine/commonsense.py).

``DIR/<task>/test.json`` for each task folder of ``DIR``: a JSON list (as LLM-Adapters ships them) or JSON lines
of records with a string ``instruction`` (the question with its numbered choices, as the file has it) and a
string ``answer`` (``true``, ``solution2``, ``answer3``, ``ending1``, ``option2``...); any other field is ignored.
A task is one of :data:`TASKS`, named as LLM-Adapters names its folders (letter case aside). Sub-folders without a
``test.json`` are skipped; a sub-folder with one whose name is not a task, a record that lacks a field or holds a
non-string, a file that is not JSON: one-line :class:`DatasetError` naming the file, the record and its line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from varprune.data.base import DatasetError
from varprune.data.instructions import parse_records

__all__ = ["TASKS", "CommonsenseSet", "read_commonsense"]

# LLM-Adapters' folder names, in the order of its table
TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
_CANONICAL = {t.lower(): t for t in TASKS}
TEST_FILE = "test.json"


@dataclass
class CommonsenseSet:
    """One task's test records: ``instructions`` and their ``answers`` (strings), each record's ``lines``."""

    task: str
    file: str
    instructions: list[str]
    answers: list[str]
    lines: list[int]

    def __len__(self) -> int:
        return len(self.instructions)

    def where(self, i: int) -> str:
        return f"{self.file} record {i + 1} (line {self.lines[i]})"


def _read_set(task: str, path: Path) -> CommonsenseSet:
    instructions: list[str] = []
    answers: list[str] = []
    lines: list[int] = []
    for obj, line, where in parse_records(path, '{"instruction": ..., "answer": ...}'):
        for key in ("instruction", "answer"):
            if key not in obj:
                raise DatasetError(f"{where} lacks the field {key!r}; every test record needs instruction and answer")
            if not isinstance(obj[key], str):
                raise DatasetError(f"{where}: {key!r} is not a string; fix the record")
        instructions.append(obj["instruction"])
        answers.append(obj["answer"])
        lines.append(line)
    if not instructions:
        raise DatasetError(f"{path} holds no records; it needs a JSON list of {{instruction, answer}} records")
    return CommonsenseSet(task, str(path), instructions, answers, lines)


def read_commonsense(folder: str | os.PathLike) -> list[CommonsenseSet]:
    """Every task's test set under ``folder``, in :data:`TASKS`' order; everything is read and checked before
    anything is returned (see the module docstring)."""
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"--commonsense {root} is not a folder; give a folder holding <task>/test.json")
    found: dict[str, Path] = {}
    for sub in sorted(root.iterdir()):
        if not (sub / TEST_FILE).is_file():
            continue
        task = _CANONICAL.get(sub.name.lower())
        if task is None:
            raise DatasetError(
                f"{sub / TEST_FILE}: {sub.name!r} is not a commonsense task (known: {', '.join(TASKS)}); "
                f"rename the folder or move it out of {root}"
            )
        if task in found:
            raise DatasetError(f"{root} holds {task} twice ({found[task].name} and {sub.name}); keep one")
        found[task] = sub
    if not found:
        raise DatasetError(
            f"{root} holds no <task>/{TEST_FILE} (tasks: {', '.join(TASKS)}); point --commonsense at LLM-Adapters' "
            f"dataset folder or one laid out like it"
        )
    return [_read_set(task, found[task] / TEST_FILE) for task in TASKS if task in found]
