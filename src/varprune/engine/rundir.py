"""A run folder's lifecycle: which files are varprune's, the lock, and safe replacement.

A run folder holds config.json, metrics.jsonl, checkpoint.safetensors,
model.safetensors, the prune results made from the weights, and a marker file
``.varprune-run``. varprune only ever creates, replaces or deletes files of
those names, and only in a folder it recognises as its own (the marker, or a
config.json of varprune's from before the marker existed). A user's files in
the same folder are never touched.

``--overwrite`` never loses the old run to a new one that cannot start: the old
files are moved aside into ``.replaced-run/`` only after the new run has
checked its configuration and loaded its data, and are deleted only once the
new run has written its first complete checkpoint. If the new run fails
before that, they are moved back; if it is killed, the next varprune command
on the folder moves them back (:meth:`RunFolder.recover`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from varprune import __version__
from varprune.errors import RunError
from varprune.storage.checkpoint import atomic_write_text, remove_stale_temporaries

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, WEIGHTS)
DERIVED_FILES = ("prune.json", "prune.csv", "prune.png")  # made from WEIGHTS; stale once it is replaced
MARKER = ".varprune-run"
ASIDE = ".replaced-run"
ASIDE_COMPLETE = ".complete"  # in ASIDE once every old file is in it: only then are files outside it new
OWN_FILES = RUN_FILES + DERIVED_FILES + (MARKER,)


def _looks_like_our_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("train"), dict)
        and isinstance(data.get("resolved"), dict)
        and "varprune" in data["resolved"]
    )


def path_problem(path, flag: str = "--out") -> str | None:
    """Why ``path`` cannot be a folder varprune creates (too long, or an existing file); None if it can."""
    text = str(path)
    if len(os.fsencode(text)) > 4000 or any(len(os.fsencode(part)) > 255 for part in Path(text).parts):
        return f"{flag} {text[:40]}... is longer than the file system allows; choose a shorter {flag}"
    try:
        if Path(text).exists() and not Path(text).is_dir():
            return f"{text} exists and is not a folder; choose another {flag}"
    except OSError as e:
        return f"{flag} {text[:60]} cannot be used ({e.strerror or e}); choose another {flag}"
    return None


def read_metrics(run) -> list[dict]:
    """RUN/metrics.jsonl, one record per epoch; a damaged or edited file is a RunError naming
    the file and the line (``varprune train --resume RUN`` rewrites it from the checkpoint)."""
    path = Path(run) / METRICS
    fix = f"`varprune train --resume {run}` rewrites it from the run's checkpoint"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RunError(f"{path} not found: is {run} a finished run? {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"cannot read {path} ({getattr(e, 'strerror', None) or type(e).__name__}); {fix}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise RunError(f"{path} line {number} is not an epoch record (damaged or edited); {fix}")
        records.append(record)
    if not records:
        raise RunError(f"{path} holds no epoch record; {fix}")
    return records


class RunFolder:
    """One run folder. Nothing happens on construction; methods say what they touch."""

    def __init__(self, path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def ours(self) -> bool:
        """Did varprune make this folder's run files?"""
        return (self.path / MARKER).is_file() or _looks_like_our_config(self.path / CONFIG)

    def existing(self, names=OWN_FILES) -> list[str]:
        return [n for n in names if (self.path / n).exists() and n != MARKER]

    # ------------------------------------------------------------ checks (read only)

    def new_run_problems(self, overwrite: bool) -> list[str]:
        """Why a new run cannot go into this folder (empty if it can)."""
        out = self.path
        bad = path_problem(out)
        if bad:
            return [bad]
        if not out.exists():
            return []
        ours = self.ours()
        mine = self.existing()
        if mine and not ours:
            return [
                f"{out} holds files varprune did not make ({', '.join(mine)}); varprune will not touch them: "
                f"choose another --out"
            ]
        run = self.existing(RUN_FILES)
        if run and not overwrite:
            return [
                f"{out} already holds a run ({', '.join(run)}); use --resume {out} to continue it, "
                f"--overwrite to replace it, or choose another --out"
            ]
        return []

    def resume_problems(self) -> list[str]:
        out = self.path
        if out.exists() and not out.is_dir():
            return [f"{out} is not a run folder"]
        if out.is_dir() and self.existing() and not self.ours():
            return [f"{out} holds files varprune did not make; it is not a varprune run folder"]
        return []

    # ------------------------------------------------------------ changes

    @contextlib.contextmanager
    def lock(self):
        """Hold ``.lock`` while working: a second process on the same folder is refused
        (the kernel drops the lock when its holder dies, however it dies)."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create {self.path} ({e.strerror or e}); choose another --out") from None
        try:
            yield from self._locked()
        finally:
            if created:  # a run that failed before writing anything (bad data) leaves no folder behind
                self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        try:
            if {p.name for p in self.path.iterdir()} <= {".lock"}:
                (self.path / ".lock").unlink(missing_ok=True)
                self.path.rmdir()
        except OSError:
            pass

    def _locked(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        try:
            f = open(self.path / ".lock", "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
        except OSError as e:
            raise RunError(f"cannot write to {self.path} ({e.strerror or e})") from None
        try:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RunError(
                    f"{self.path} is being trained by another varprune process; wait for it or choose another --out"
                ) from None
            self.recover()
            yield
        finally:
            f.close()

    def mark(self) -> None:
        if not (self.path / MARKER).exists():
            atomic_write_text(self.path / MARKER, json.dumps({"varprune": __version__, "kind": "run"}) + "\n")

    def clean_temporaries(self) -> None:
        """Delete what an interrupted write of varprune's left (in a folder of varprune's only)."""
        if self.ours():
            remove_stale_temporaries(self.path, OWN_FILES)

    def set_aside(self) -> None:
        """Move the old run's files into ``.replaced-run/`` (``--overwrite``, after every check passed)."""
        aside = self.path / ASIDE
        names = self.existing()
        if not names:
            return
        try:
            aside.mkdir(exist_ok=True)
            # config.json first: a folder caught half-moved is never mistaken for the old run by --resume
            for name in sorted(names, key=lambda n: n != CONFIG):
                (self.path / name).replace(aside / name)
            (aside / ASIDE_COMPLETE).touch()
        except OSError as e:
            self.restore()
            raise RunError(f"cannot replace the run in {self.path} ({e.strerror or e}); nothing was changed") from None

    def commit(self) -> None:
        """The new run has a complete checkpoint: the old one can go."""
        shutil.rmtree(self.path / ASIDE, ignore_errors=True)

    def restore(self) -> None:
        """Put the old run back (the new one failed before its first checkpoint):
        the new run's beginnings (config.json, metrics.jsonl) are removed first. If
        :meth:`set_aside` itself was interrupted, the files outside ``ASIDE`` are the
        old run's that were not moved yet: they stay."""
        aside = self.path / ASIDE
        if not aside.is_dir():
            return
        if (aside / ASIDE_COMPLETE).exists():
            for name in RUN_FILES:
                if (self.path / name).exists():
                    (self.path / name).unlink()
        for name in OWN_FILES:
            if (aside / name).exists():
                (aside / name).replace(self.path / name)
        shutil.rmtree(aside, ignore_errors=True)

    def recover_if_idle(self) -> None:
        """:meth:`recover`, if an ``--overwrite`` was killed here and no process holds the folder
        (``prune``, ``report`` and the other readers call this first: they see the complete run)."""
        if not (self.path / ASIDE).is_dir():
            return
        try:
            import fcntl

            f = open(self.path / ".lock", "a+")  # noqa: SIM115 (held open while recovering)
        except (ImportError, OSError):
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return  # a varprune process is working here: it recovers or commits itself
        try:
            self.recover()
        finally:
            f.close()

    def recover(self) -> None:
        """After a crash during ``--overwrite``: keep whichever run is complete."""
        if not (self.path / ASIDE).is_dir():
            return
        if (self.path / ASIDE / ASIDE_COMPLETE).exists() and (self.path / CHECKPOINT).exists():
            self.commit()  # the new run's first checkpoint
        else:
            self.restore()
        self.clean_temporaries()  # a write the kill interrupted (the new run's config.json, say)
