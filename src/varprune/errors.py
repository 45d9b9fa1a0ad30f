"""The errors a user can cause, and the exit code each one means, in one place.

* exit 2: bad input; the message is one line naming the problem and the fix.
  :class:`UsageError` (flags), :class:`RunError` (configuration, run folders),
  :class:`DatasetError`, :class:`CheckpointError`, ``PrunedFormatError`` and
  every other ``ValueError`` a library check raises: they are all
  ``ValueError`` subclasses, so a library user can catch them together.
* exit 3: :class:`NonFiniteError`, training stopped being finite.
* exit 1: the system failed: ``OSError`` (disk full, permissions: the file is
  named) and ``MemoryError`` / an allocator's out-of-memory (what did not fit
  is said).
* 130 / 143: Ctrl-C / SIGTERM (``KeyboardInterrupt`` / the CLI's Terminated).

:func:`exit_code` maps an exception to its code, :func:`one_line` to its
message; ``varprune.cli.main`` uses both, and nothing else decides exit codes.
"""

from __future__ import annotations

import contextlib

EXIT_OK, EXIT_SYSTEM, EXIT_USAGE, EXIT_NONFINITE = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class UsageError(ValueError):
    """A flag or a combination of flags that cannot work (exit code 2)."""


class RunError(ValueError):
    """A problem with a run folder or its configuration (exit code 2)."""


class DatasetError(ValueError):
    """A dataset is missing or malformed; the message says where and what to do."""


class CheckpointError(ValueError):
    """A checkpoint or weights file is missing, truncated, damaged, foreign or of another model."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weight (exit code 3)."""


class OutOfMemory(RuntimeError):
    """Something did not fit in the device's memory although the estimate said it would (exit code 1)."""


# what a model's forward raises on an input it cannot take (a wrong shape, dtype, key or index); a signal's
# exception or an allocation failure (is_out_of_memory) is not the input's fault
MODEL_INPUT_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError)


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's OutOfMemoryError (CUDA) or its CPU allocator's
    plain RuntimeError."""
    if isinstance(e, MemoryError):
        return True
    if type(e) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(e):
        return True  # torch's CPU allocator raises a plain RuntimeError
    try:
        import torch

        return isinstance(e, torch.OutOfMemoryError)
    except (ImportError, AttributeError):
        return False


def exit_code(e: BaseException) -> int:
    """The exit code of an exception that ended a command."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(e, NonFiniteError):
        return EXIT_NONFINITE
    if isinstance(e, OutOfMemory) or is_out_of_memory(e):
        return EXIT_SYSTEM
    if isinstance(e, ValueError):
        return EXIT_USAGE
    if isinstance(e, OSError):
        return EXIT_SYSTEM
    raise TypeError(f"no exit code for {type(e).__name__}") from e


def one_line(e: BaseException) -> str:
    """The message of an exception that ended a command, on one line."""
    if isinstance(e, OSError) and not isinstance(e, ValueError):
        return (e.strerror or str(e)) + (f": {e.filename}" if e.filename else "")
    if is_out_of_memory(e) and not isinstance(e, OutOfMemory):
        return (
            "out of memory: "
            + (str(e).strip().splitlines() or ["the allocation failed"])[0][:200]
            + "; use a smaller --batch-size, --image-size or model"
        )
    return " ".join(str(e).split())


def set_kept_note(e: BaseException, note: str) -> None:
    """Attach to an exception what its run left behind ("nothing was kept", "the previous run was restored"):
    the command line says it in its last line."""
    with contextlib.suppress(AttributeError, TypeError):
        e.varprune_kept = note  # type: ignore[attr-defined]


def kept_note(e: BaseException) -> str | None:
    note = getattr(e, "varprune_kept", None)
    return note if isinstance(note, str) else None


def short(value, limit: int = 60) -> str:
    """``repr(value)`` on one line, at most ``limit`` characters (for error messages)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
