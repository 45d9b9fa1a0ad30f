"""A run folder's lifecycle: which files are varprune's, the lock, and safe replacement.

A run folder holds config.json, metrics.jsonl, checkpoint.safetensors,
model.safetensors, the prune results made from the weights, and a marker file
``.varprune-run``. varprune only ever creates, replaces or deletes files of
those names, and only in a folder it recognises as its own (the marker, or a
config.json of varprune's from before the marker existed). A user's files in
the same folder are never touched.

``--overwrite`` never loses the old run to a new one that cannot start: the old
files are moved aside into a folder ``.replaced-run-XXXXXXXX/`` only after the
new run has checked its configuration and loaded its data, and are deleted only
once the new run has written its first complete checkpoint. If the new run
fails before that, they are moved back. Before moving anything, the
replacement is recorded in ``.varprune-replacing`` (the aside folder's name and
the files moved): if the process is killed, the next ``varprune train`` (or
``finetune``) on the folder finishes or undoes exactly that, and nothing else
(:meth:`RunFolder.recover`). A folder named like the aside folder that varprune
did not record is a user's and is never touched. Commands that only read a run
(prune, report, analyze, export) never restore or delete anything: they refuse
a half-replaced run with the command that mends it.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from varprune import __version__
from varprune.errors import RunError
from varprune.storage.files import atomic_write_text, remove_stale_temporaries

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, WEIGHTS)
TOKENIZER = "tokenizer.json"  # a text run's tokenizer, written with config.json
DERIVED_FILES = ("prune.json", "prune.csv", "prune.png")  # made from WEIGHTS; stale once it is replaced
MARKER = ".varprune-run"
REPLACING = ".varprune-replacing"  # the record of an --overwrite in progress: {"aside", "files", "state"}
OWN_FILES = (*RUN_FILES, TOKENIZER, *DERIVED_FILES, MARKER)


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

    def discard_new_run(self) -> None:
        """Remove what a new run wrote before its first checkpoint (config.json, metrics.jsonl, the marker and
        temporaries), so a failed start leaves no half-made run folder; a user's files stay."""
        for name in (CONFIG, METRICS, TOKENIZER, MARKER):
            with contextlib.suppress(OSError):
                (self.path / name).unlink()
        self.clean_temporaries(force=True)

    def mark(self) -> None:
        if not (self.path / MARKER).exists():
            atomic_write_text(self.path / MARKER, json.dumps({"varprune": __version__, "kind": "run"}) + "\n")

    def clean_temporaries(self, force: bool = False) -> None:
        """Delete what an interrupted write of varprune's left (in a folder of varprune's only)."""
        if force or self.ours():
            remove_stale_temporaries(self.path, OWN_FILES)

    # ------------------------------------------------------------ replacing a run (--overwrite)

    def replacement(self) -> dict | None:
        """The record of an --overwrite in progress (or killed), or None."""
        try:
            data = json.loads((self.path / REPLACING).read_text())
        except (OSError, ValueError, RecursionError):
            return None
        ok = (
            isinstance(data, dict)
            and isinstance(data.get("aside"), str)
            and data["aside"].startswith(".replaced-run-")
            and "/" not in data["aside"]
            and isinstance(data.get("files"), list)
            and all(isinstance(n, str) and n in OWN_FILES for n in data["files"])
            and data.get("state") in ("moving", "moved")
        )
        return data if ok else None

    def _record(self, aside: str, files: list[str], state: str) -> None:
        atomic_write_text(self.path / REPLACING, json.dumps({"aside": aside, "files": files, "state": state}) + "\n")

    def set_aside(self) -> None:
        """Move the old run's files into a fresh ``.replaced-run-XXXXXXXX/`` (``--overwrite``, after every check
        passed), recording what is moved first."""
        names = self.existing()
        if not names:
            return
        import tempfile

        try:
            aside = Path(tempfile.mkdtemp(prefix=".replaced-run-", dir=self.path)).name
            # config.json first: a folder caught half-moved is never mistaken for the old run by --resume
            names = sorted(names, key=lambda n: n != CONFIG)
            self._record(aside, names, "moving")
            for name in names:
                (self.path / name).replace(self.path / aside / name)
            self._record(aside, names, "moved")
        except OSError as e:
            self.restore()
            raise RunError(f"cannot replace the run in {self.path} ({e.strerror or e}); nothing was changed") from None

    def commit(self) -> None:
        """The new run has a complete checkpoint: the recorded old files go (nothing else in the aside folder)."""
        record = self.replacement()
        if record is None:
            return
        aside = self.path / record["aside"]
        for name in record["files"]:
            with contextlib.suppress(OSError):
                (aside / name).unlink()
        with contextlib.suppress(OSError):
            aside.rmdir()  # only when empty: anything else in it is not varprune's to delete
        (self.path / REPLACING).unlink(missing_ok=True)

    def restore(self) -> None:
        """Put the old run back (the new one failed or was killed before its first checkpoint). When the move
        had finished, the new run's beginnings (its config.json, metrics.jsonl) are removed first; when it
        was interrupted, the files not moved yet are the old run's and stay."""
        record = self.replacement()
        if record is None:
            return
        aside = self.path / record["aside"]
        for name in record["files"]:
            if not (aside / name).exists():
                continue  # never moved (an interrupted set_aside): the old file is still in place
            if record["state"] == "moved" and (self.path / name).exists():
                (self.path / name).unlink()
            (aside / name).replace(self.path / name)
        if record["state"] == "moved":
            for name in (*RUN_FILES, TOKENIZER):  # the new run's own beginnings that have no old counterpart
                if name not in record["files"] and (self.path / name).exists():
                    (self.path / name).unlink()
        with contextlib.suppress(OSError):
            aside.rmdir()
        (self.path / REPLACING).unlink(missing_ok=True)

    def half_replaced_problem(self) -> str | None:
        """For commands that only read a run: why it cannot be read as it is (an interrupted --overwrite)."""
        record = self.replacement()
        if record is None:
            return None
        return (
            f"{self.path} is half replaced: a `varprune train --overwrite` was interrupted (the previous run is "
            f"in {self.path / record['aside']}); `varprune train --resume {self.path}` puts the previous run back, "
            f"or continues the new one if it reached a checkpoint"
        )

    def recover_if_idle(self) -> None:
        """:meth:`recover`, taking the folder's lock (``train --resume`` calls it before reading config.json,
        which an interrupted --overwrite may have left as the new run's)."""
        if self.replacement() is None:
            return
        with self.lock():
            pass  # lock() recovers once it holds the folder

    def recover(self) -> None:
        """After a crash during ``--overwrite`` (only what :meth:`set_aside` recorded): keep whichever run is
        complete. Called by the commands that write the run (train, finetune), holding its lock."""
        record = self.replacement()
        if record is not None:
            if record["state"] == "moved" and (self.path / CHECKPOINT).exists():
                self.commit()  # the new run's first checkpoint
            else:
                self.restore()
        self.clean_temporaries()  # a write the kill interrupted (the new run's config.json, say)
