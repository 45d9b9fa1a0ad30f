"""Which text a run was trained on, exactly: sha256 digests of its split files and of its tokenizer.

A text run records them in its config.json when it is trained (``resolved.text_sha256``: split -> digest, and
``resolved.tokenizer.sha256``); every later command that reads the run's data or tokenizer computes them again and
refuses a mismatch (engine/identity.py). Only names and bytes are used: two copies of the same file in different
folders have the same digest, and one changed byte changes it.

* :func:`text_digests`: split -> sha256 of the file's bytes, for the folder layouts (``train.txt``,
  ``wiki.test.raw``, ``train.jsonl``: the file as it is on disk, byte-order mark included).
* :func:`content_digest`: the sha256 of a split that is not one file (fortunes: the entries the split drew from
  many files), over its texts and, for classification, their class names.
* :func:`sha256_hex`: the digest of bytes (a tokenizer.json as written).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["content_digest", "file_sha256", "sha256_hex", "text_digests"]


def sha256_hex(data: bytes | str) -> str:
    """The sha256 of ``data`` (a str as its UTF-8 bytes), in hexadecimal."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_digests(files: Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """``{split: sha256 of the file's bytes}`` for ``{split: path}`` (``OSError`` if one cannot be read)."""
    return {split: file_sha256(Path(path)) for split, path in files.items()}


def content_digest(texts: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """The sha256 of a split given as its texts (and, for classification, each text's class name), in order: the
    same entries in the same order give the same digest, wherever they were read from."""
    rows = list(texts) if labels is None else [[str(label), text] for text, label in zip(texts, labels)]
    return sha256_hex(json.dumps(rows, ensure_ascii=False))
