"""The errors a user can cause, and the exit code each one means (cli.main maps them).

* exit 2: bad input; the message is one line naming the problem and the fix.
  :class:`RunError` (configuration, run folders), ``DatasetError`` (data.py),
  ``CheckpointError`` (checkpoint.py), ``PrunedFormatError`` (sparse_format.py)
  are all ``ValueError`` subclasses, so a library user can catch them together.
* exit 3: :class:`NonFiniteError`, training stopped being finite.
"""
from __future__ import annotations


class RunError(ValueError):
    """A problem with a run folder or its configuration (exit code 2)."""


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message says where and what to do."""


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, truncated, damaged, foreign or of another model."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weight (exit code 3)."""


def short(value, limit: int = 60) -> str:
    """``repr(value)`` on one line, at most ``limit`` characters (for error messages)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
