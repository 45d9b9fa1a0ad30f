"""Command line: ``varprune COMMAND``, assembled from varprune.commands (one module per command).

Each command module owns its flags (``add_parser``) and its work (``run``); this file only builds the parser,
runs the command, and turns its outcome into an exit code through ``errors.exit_code``:

* 0 done; 2 bad input (one line on stderr naming the problem and the fix);
* 3 training stopped being finite (NonFiniteError);
* 1 the disk or the system failed (OSError, with the file named), or something did not fit in memory;
* 130 / 143 interrupted by Ctrl-C / SIGTERM (what was kept is said).

Under torchrun (``torchrun --nproc-per-node N -m varprune train ...``) train,
finetune and study run data-parallel (engine/distributed.py); every other command
runs on rank 0 alone while the other processes exit 0 at once. Each process
exits with the codes above (a non-finite loss on any process: 3 on all of
them; torchrun itself then exits 1 and lists the processes' exit codes).

Nothing heavy is imported at module level, so ``varprune doctor`` runs even
where torch or numpy are broken: that is when it is needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from varprune import __version__
from varprune.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SYSTEM,
    EXIT_TERMINATED,
    EXIT_USAGE,
    NonFiniteError,
    UsageError,
    exit_code,
    kept_note,
    one_line,
)

DATA_PARALLEL = ("train", "finetune", "study")  # the commands that run on every torchrun process
COMMANDS = (
    "train",
    "prune",
    "study",
    "tune",
    "analyze",
    "export",
    "evaluate",
    "finetune",
    "report",
    "doctor",
    "demo",
    "convert-gguf",
    "choices",
)


class Terminated(Exception):
    """SIGTERM, turned into an exception so that what was kept can be said (exit 143)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from varprune.commands.common import epilog

    parser = _Parser(prog="varprune", description="Train networks that survive one-shot magnitude pruning.")
    parser.add_argument("--version", action="version", version=f"varprune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True
    text = epilog()
    for name in COMMANDS:
        importlib.import_module(f"varprune.commands.{name.replace('-', '_')}").add_parser(sub, text)
    return parser


_ended: dict = {"code": None, "who": "varprune"}  # set once the command has ended: a late SIGTERM keeps its code


def _say(line: str) -> None:
    """One line on stderr in one write, so the lines of two torchrun processes never run into each other."""
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


def _on_sigterm(signum, frame):
    code = _ended["code"]
    if code is None:
        raise Terminated()
    # the command has already ended (its line is said): a SIGTERM now (torchrun stopping the other processes
    # after one failed, or a late kill) must not turn its exit code into a signal
    if code == 0:
        _say(f"{_ended['who']}: terminated (SIGTERM) after the command had finished; everything was written")
    os._exit(code)


class _NotesOnce(logging.Handler):
    """A model folder's load notes (models/hf.py logs them at INFO): each printed once a command, one line on
    stderr, as ``varprune: note: hf:DIR: ...``; library use prints nothing (no handler there)."""

    def __init__(self, who: str):
        super().__init__(logging.INFO)
        self.who = who
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        line = " ".join(record.getMessage().split())
        if line not in self.seen:
            self.seen.add(line)
            _say(f"{self.who}: note: {line}")


def _interrupted(argv, e: BaseException) -> str:
    note = kept_note(e)
    if note is not None:
        return note
    command = next((a for a in argv if not a.startswith("-")), "")
    if command in ("train", "finetune"):
        return "nothing was left half-written"
    if command in ("study", "demo"):
        return "finished runs and sweeps are kept; the same command continues"
    if command == "prune":
        return "runs whose prune.json was written are kept; the same command continues with the others"
    return "nothing was left half-written"


def main(argv=None) -> int:
    """Run one command; return its exit code. As the program (``argv`` None), a SIGTERM after the command has
    ended (torchrun stopping the other processes once one failed) does not change the exit code; called
    in-process with ``argv``, the caller's handler comes back."""
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:  # before anything that imports torch
        return _doctor_only(argv)
    from varprune.engine import distributed

    who = f"varprune[rank {distributed.env_rank()}]" if distributed.env_rank() else "varprune"
    _ended.update(code=None, who=who)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        previous = None
    notes = logging.getLogger("varprune.load_notes")
    handler, level = _NotesOnce(who), notes.level
    notes.addHandler(handler)
    notes.setLevel(logging.INFO)
    code = EXIT_OK
    together = False  # every process failed at the same point (distributed.agreed): they leave the group together
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command not in DATA_PARALLEL and not distributed.main_only():
            return EXIT_OK  # under torchrun, rank 0 runs this command alone
        code = args.func(args)
        return code
    except Terminated as e:
        code = _ended["code"] = EXIT_TERMINATED
        _say(f"{who}: terminated (SIGTERM); {_interrupted(argv, e)}")
        return code
    except KeyboardInterrupt as e:
        code = _ended["code"] = EXIT_INTERRUPTED
        _say(f"{who}: interrupted; {_interrupted(argv, e)}")
        return code
    except (ValueError, NonFiniteError, OSError, MemoryError, RuntimeError) as e:
        try:
            code = exit_code(e)
        except TypeError:
            raise e from None  # a bug: the traceback is what a bug report needs
        _ended["code"] = code  # from here a SIGTERM keeps this code (see _on_sigterm)
        together = distributed.is_agreed(e)
        note = kept_note(e)
        extra = f"; {note}" if note and code == EXIT_SYSTEM else ""
        _say(f"{who}: error: {one_line(e)}{extra}")
        return code
    finally:
        notes.removeHandler(handler)
        notes.setLevel(level)
        _ended["code"] = code
        try:
            distributed.shutdown(together=code == EXIT_OK or together)
        finally:
            if previous is not None and not program:
                signal.signal(signal.SIGTERM, previous)
            elif previous is not None:
                # Python's finalisation puts a Python handler back to the default (a late SIGTERM would kill the
                # process by the signal), but leaves "ignore" alone: the command has ended, its code stands
                signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _doctor_only(argv) -> int:
    parser = _Parser(prog="varprune doctor")
    parser.add_argument("doctor")
    parser.add_argument("--data-dir")
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        _say(f"varprune: error: {e}")
        return EXIT_USAGE
    from varprune.commands import doctor

    return doctor.run(args)


if __name__ == "__main__":
    sys.exit(main())
