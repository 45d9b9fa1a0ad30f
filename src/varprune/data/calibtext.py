"""Calibration inputs for the one-shot pruners from a local file (``--calib-data``), drawn as their references do.

* JSON lines of ``{"text": ...}`` (``.jsonl``/``.json``: C4's shards once unpacked): the C4 protocol of Wanda's and
  SparseGPT's code. A document (a line) is drawn uniformly at random, tokenized on its own with the run's tokenizer
  (no special token), and kept only if it holds more than ``seq_len`` tokens; one window of ``seq_len`` tokens at a
  uniform offset ``0 .. L - seq_len - 1`` (the references' range) is one calibration input. Windows never straddle
  two documents, and only the lines drawn are read and parsed: a shard of a gigabyte costs one pass to find where its
  lines start (8 bytes of memory a line), not a tokenization of the whole file.
* Plain text (``.txt``/``.raw``): read whole and tokenized once, windows at uniform offsets of the token stream, as
  the training split's own calibration is drawn (:func:`varprune.data.tokens.stream_windows`).

Draws come from a CPU generator seeded with ``seed``: the same file and tokenizer give the same inputs on any device,
so every run of a study is pruned from the same calibration text.
"""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import numpy as np
import torch

from varprune.data.base import DatasetError, gib
from varprune.data.text import JSONL_MEMORY_FACTOR, open_regular, read_text
from varprune.device import available_memory

__all__ = [
    "DOCUMENT_SUFFIXES",
    "MAX_DRAWS_PER_INPUT",
    "TEXT_SUFFIXES",
    "calibration_protocol",
    "calibration_windows",
    "line_starts",
    "suffix_problem",
]

TEXT_SUFFIXES = (".txt", ".raw")
DOCUMENT_SUFFIXES = (".jsonl", ".json")
MAX_DRAWS_PER_INPUT = 200  # documents drawn per window asked before giving up (C4 with seq 2048: a few percent qualify)
_CHUNK = 16 * 2**20  # bytes read at a time while finding the line starts


def suffix_problem(path: str | os.PathLike) -> str | None:
    """The one line refusing a --calib-data file by its name (a format not read here), or None."""
    if Path(path).suffix.lower() in TEXT_SUFFIXES + DOCUMENT_SUFFIXES:
        return None
    return f'--calib-data {path}: give a .txt file or a .jsonl/.json file of {{"text": ...}} lines (unpack a .gz first)'


def calibration_protocol(path: str | os.PathLike) -> str:
    """How windows are drawn from the file (prune.json records it): ``"documents"`` (one window from one document
    of a JSON-lines file, the references' C4 protocol) or ``"stream"`` (windows of a plain text's token stream)."""
    return "documents" if Path(path).suffix.lower() in DOCUMENT_SUFFIXES else "stream"


def calibration_windows(path: str | os.PathLike, tokenizer, n: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """``n`` windows of ``seq_len`` token ids, each a (1, seq_len) int64 CPU tensor, from the file at ``path``
    (JSON lines: one document per window, see the module's docstring; plain text: windows of the whole stream).
    Anything wrong is a one-line DatasetError naming the file (and the line)."""
    from varprune.data.tokens import encode_stream, stream_windows

    path = Path(path)
    problem = suffix_problem(path)
    if problem:
        raise DatasetError(problem)
    if n < 1 or seq_len < 2:
        raise DatasetError(f"calibration needs at least one window of at least 2 tokens (asked {n} of {seq_len})")
    if calibration_protocol(path) == "stream":
        text, size = read_text(path)
        stream = encode_stream(tokenizer, text, what=str(path), num_bytes=size)
        return stream_windows(stream, n, seq_len, path, seed)
    with open_regular(path, missing="give an existing file to --calib-data") as f:
        starts = line_starts(f, path)
        g = torch.Generator().manual_seed(seed)
        windows: list[torch.Tensor] = []
        draws = documents = 0
        while len(windows) < n:
            if draws == MAX_DRAWS_PER_INPUT * n:
                if not documents:
                    raise DatasetError(f"{path} holds no document in the {draws} lines drawn (blank lines only?)")
                raise DatasetError(
                    f"{path}: {draws} documents drawn gave {len(windows)} of the {n} calibration windows: too few "
                    f"documents hold more than {seq_len} tokens; give longer documents (C4's train shards have them) "
                    f"or a lower --calib-seq-len"
                )
            draws += 1
            line = int(torch.randint(len(starts) - 1, (1,), generator=g))
            text = _document(f, path, starts, line)
            documents += bool(text)
            ids = tokenizer.encode(text)
            if len(ids) > seq_len:
                at = int(torch.randint(len(ids) - seq_len, (1,), generator=g))
                windows.append(torch.tensor(ids[at : at + seq_len], dtype=torch.int64).unsqueeze(0))
    return windows


def line_starts(f, path: Path) -> np.ndarray:
    """Where each line of the open binary file ``f`` starts, and its size last (``len - 1`` lines): int64 offsets.
    The lines are counted first and the array's size checked against the memory available."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise DatasetError(f"{path} is empty; it should hold one JSON object per line")
    f.seek(0)
    count = 0
    while chunk := f.read(_CHUNK):
        count += chunk.count(b"\n")
    lines = count + (not _ends_with_newline(f, size))
    need, free = 8 * (lines + 1), available_memory("cpu")
    if need > free:
        raise DatasetError(f"{path} has {lines} lines, whose index needs {gib(need)} ({gib(free)} available)")
    starts = np.empty(lines + 1, dtype=np.int64)
    starts[0], at, offset = 0, 1, 0
    f.seek(0)
    while chunk := f.read(_CHUNK):
        ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 0x0A) + offset + 1
        if at + len(ends) > lines + 1:
            raise DatasetError(f"{path} changed while it was read; give a file nothing else writes to")
        starts[at : at + len(ends)] = ends
        at += len(ends)
        offset += len(chunk)
    starts[lines] = size  # the last line ends at the end of the file, newline or not
    return starts


def _ends_with_newline(f, size: int) -> bool:
    f.seek(size - 1)
    return f.read(1) == b"\n"


def _document(f, path: Path, starts: np.ndarray, line: int) -> str:
    """The text of line ``line`` (0-based) as a document; a blank line is an empty document (too short)."""
    begin, end = int(starts[line]), int(starts[line + 1])
    if (end - begin) * JSONL_MEMORY_FACTOR > available_memory("cpu"):
        raise DatasetError(f"{path} line {line + 1} is too large to read into memory ({gib(end - begin)})")
    f.seek(begin)
    raw = f.read(end - begin)
    if line == 0 and raw.startswith(codecs.BOM_UTF8):
        raw, begin = raw[len(codecs.BOM_UTF8) :], begin + len(codecs.BOM_UTF8)
    if not raw.strip():
        return ""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} line {line + 1} is not UTF-8 (byte offset {begin + e.start}); convert it") from None
    except ValueError:
        where = f"{path} line {line + 1}"
        raise DatasetError(f'{where} is not JSON; each line must be one object {{"text": ...}}') from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DatasetError(f'{path} line {line + 1} has no string field "text"')
    return obj["text"]
