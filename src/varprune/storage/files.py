"""Writing files safely: atomic writes, and the rule for every path a user names as an output.

Atomic writes: the bytes go to a temporary file in the same folder
(``.NAME.varprune-XXXXXXXX.tmp``), fsynced, then renamed over the target, so a
reader sees the old file or the new one, never a torn one. Only a regular file
(or nothing) is ever renamed over: a device, FIFO, socket, folder or symbolic
link at the target is refused, so ``--out /dev/null`` cannot replace the device
node.

The output rule (``check_output_file``, ``OutputFolder``), for every file or
folder a user names (``export --out``, ``report --plot/--html``, ``prune
--plot``, ``study/tune/analyze/demo --out``):

* a file of a varprune run folder (any run's) is never replaced;
* a file varprune did not write is never replaced unless ``--overwrite`` is
  given; varprune recognises its own files by what they carry (the pruned
  format's metadata, a PNG's ``Software`` text, the HTML page's generator tag)
  or, in an output folder, by the folder's manifest ``.varprune-output``
  (each file's sha256 when varprune wrote it: a file edited since is the
  user's);
* anything that is not a regular file is refused, with or without
  ``--overwrite``;
* a file whose folder does not exist is refused with the fix (an output
  folder is created, with its parents, like a run folder).

Every refusal is a :class:`~varprune.errors.RunError` (exit 2) naming the path,
raised before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from varprune.errors import RunError

_UMASK = os.umask(0)
os.umask(_UMASK)
TMP_TAG = ".varprune-"
MANIFEST = ".varprune-output"
RUN_MARKER = ".varprune-run"  # engine/rundir.py's marker of a run folder (named here: storage is below engine)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def non_regular(path: str | os.PathLike) -> str | None:
    """``"a folder"``, ``"a FIFO (named pipe)"``... if ``path`` exists and is not a regular file; else None.
    A symbolic link counts as not regular (renaming over it would replace the link, not its target)."""
    try:
        return _kind(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically. An OSError (a full disk, a read-only
    folder) names ``path``, not the temporary file, and leaves the old file as it was.
    A target that exists and is not a regular file is refused (RunError) untouched."""
    path = Path(path)
    what = non_regular(path)
    if what is not None:
        raise RunError(f"{path} is {what}; varprune writes regular files only: give another file name")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_TAG}", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; a run folder should read like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if non_regular(path) is not None:  # appeared since the check: still never renamed over
            raise RunError(f"{path} is {non_regular(path)}; varprune writes regular files only")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):  # "No space left on device" must say which file could not be written
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _temporary_pattern(name: str) -> re.Pattern:
    # ours: .NAME.varprune-XXXXXXXX.tmp; and .NAME.XXXXXXXX.tmp as varprune 0.2 named them (mkstemp's 8 characters)
    return re.compile(rf"^\.{re.escape(name)}(?:{re.escape(TMP_TAG)})?[a-z0-9_]{{8}}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write_bytes` left in ``folder`` for the files
    ``names``; return what was removed. Only names of exactly the temporary pattern go; a user's
    ``.model.safetensors.my-backup.tmp`` is not ours to delete."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    patterns = [_temporary_pattern(n) for n in names]
    for entry in entries:
        if any(p.match(entry.name) for p in patterns):
            try:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def in_run_folder(path: str | os.PathLike) -> Path | None:
    """The varprune run folder ``path`` is directly in (its marker, or a config.json of varprune's), or None."""
    folder = Path(path).parent
    if (folder / RUN_MARKER).is_file():
        return folder
    try:
        data = json.loads((folder / "config.json").read_text())
        if (
            isinstance(data, dict)
            and isinstance(data.get("train"), dict)
            and isinstance(data.get("resolved"), dict)
            and "varprune" in data["resolved"]
        ):
            return folder
    except (OSError, ValueError, RecursionError):
        pass
    return None


def check_output_file(
    path: str | os.PathLike,
    flag: str,
    overwrite: bool = False,
    ours: Callable[[Path], bool] | None = None,
    suffixes: tuple[str, ...] = (),
) -> Path:
    """``path`` checked as a file varprune may write (the output rule in the module docstring); returns it.

    ``ours(path)``: whether an existing file was written by varprune (may be replaced without
    ``--overwrite``); ``suffixes``: the accepted endings, e.g. ``(".png",)``.
    """
    path = Path(path)
    what = non_regular(path)
    if what is not None:
        hint = (
            f"; give a file name inside it, such as {path / ('out' + (suffixes[0] if suffixes else ''))}"
            if what == "a folder"
            else "; give another file name"
        )
        raise RunError(f"{flag} {path} is {what}, which varprune never replaces{hint}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise RunError(
            f"{flag} {path} does not end in {' or '.join(suffixes)}; give a file name such as "
            f"{path.with_suffix(suffixes[0]).name}"
        )
    if not path.parent.is_dir():
        raise RunError(f"{flag} {path}: folder {path.parent} does not exist; create it first or choose another path")
    if path.exists():
        run = in_run_folder(path)
        if run is not None:
            raise RunError(
                f"{flag} {path} is a file of the varprune run in {run}, which varprune never replaces; write elsewhere"
            )
        if not overwrite and not (ours is not None and ours(path)):
            raise RunError(
                f"{flag} {path} exists and was not written by varprune; pass --overwrite to replace it, "
                f"or choose another name"
            )
    return path


def png_is_ours(path: Path) -> bool:
    """A PNG written by varprune: its ``Software`` text chunk says so (report/figures.py writes it)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.format == "PNG" and str(im.info.get("Software", "")).startswith("varprune")
    except Exception:  # not an image, unreadable: not ours
        return False


def html_is_ours(path: Path) -> bool:
    """An HTML page written by varprune: the generator tag in its first kilobytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return b'<meta name="generator" content="varprune' in head


class OutputFolder:
    """A folder varprune writes outputs into (a study, a tuning, an analysis, a demo), with its manifest.

    ``.varprune-output`` records the kind of folder and the sha256 of every file varprune wrote there.
    :meth:`check` refuses (before any work) to go on when a file it will write exists and is not varprune's
    own unchanged output, unless ``overwrite``; :meth:`write_bytes` writes atomically and records the digest.
    ``legacy``: ``(file, keys)``, a JSON file with these top-level keys that marks a folder of an older varprune
    (written before the manifest existed) as varprune's.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: str,
        flag: str = "--out",
        overwrite: bool = False,
        legacy: tuple[str, tuple[str, ...]] | None = None,
    ):
        self.path = Path(path)
        self.kind = kind
        self.flag = flag
        self.overwrite = overwrite
        self.legacy = legacy

    def _manifest(self) -> dict:
        try:
            data = json.loads((self.path / MANIFEST).read_text())
            return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}
        except (OSError, ValueError, RecursionError):
            return {}

    def owns(self, name: str) -> bool:
        """Was ``name`` written here by varprune and left as it was?"""
        target = self.path / name
        recorded = self._manifest().get("files", {}).get(name)
        if recorded is not None:
            try:
                return file_digest(target) == recorded
            except OSError:
                return False
        return self._legacy() and not (self.path / MANIFEST).exists()

    def _legacy(self) -> bool:
        if self.legacy is None:
            return False
        name, keys = self.legacy
        try:
            data = json.loads((self.path / name).read_text())
        except (OSError, ValueError, RecursionError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys)

    def check(self, names: Iterable[str] = ()) -> None:
        """Every problem with writing ``names`` into this folder, as one RunError; nothing is touched."""
        what = non_regular(self.path)
        if what is not None and what != "a folder":
            raise RunError(f"{self.flag} {self.path} is {what}; give a folder")
        if self.path.exists():
            if in_run_folder(self.path / "x") is not None:
                raise RunError(f"{self.flag} {self.path} is a varprune run folder; choose another {self.flag}")
            kind = self._manifest().get("kind")
            if kind not in (None, self.kind):
                raise RunError(
                    f"{self.flag} {self.path} holds varprune's {kind} output, not a {self.kind}; "
                    f"choose another {self.flag}"
                )
        found = []
        for name in names:
            target = self.path / name
            kind = non_regular(target)
            if kind is not None:
                found.append(f"{target} is {kind}, which varprune never replaces")
            elif target.exists() and not self.overwrite and not self.owns(name):
                found.append(
                    f"{target} exists and was not written by varprune (or was edited since); pass "
                    f"--overwrite to replace it, or choose another {self.flag}"
                )
        if found:
            raise RunError("; ".join(found))

    def mkdir(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create {self.path} ({e.strerror or e}); choose another {self.flag}") from None
        if not (self.path / MANIFEST).exists():
            self._record({})

    def _record(self, files: dict) -> None:
        atomic_write_text(
            self.path / MANIFEST,
            json.dumps({"varprune": "output", "kind": self.kind, "files": files}, indent=1, sort_keys=True) + "\n",
        )

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Write ``name`` atomically and record it as varprune's."""
        self.mkdir()
        target = self.path / name
        atomic_write_bytes(target, data)
        files = dict(self._manifest().get("files", {}))
        files[name] = hashlib.sha256(data).hexdigest()
        self._record(files)
        return target

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode())

    def record(self, name: str) -> None:
        """Record a file written by another writer (a figure function) as varprune's."""
        files = dict(self._manifest().get("files", {}))
        files[name] = file_digest(self.path / name)
        self._record(files)
