"""The text family: plain-text corpora for language modeling, JSONL for text classification, and the BSD
``fortunes`` quotations as a small offline demonstration corpus.

* ``text`` (language modeling): ``DIR/train.txt``, ``DIR/test.txt``, optional ``DIR/valid.txt``; or WikiText's
  raw files as they come (``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``, in DIR or in the archive's
  ``wikitext-2-raw`` / ``wikitext-103-raw`` folder). Each split is read whole: the WikiText perplexity protocol
  tokenizes the test text once, whole.
* ``text-classification``: ``DIR/train.jsonl``, ``DIR/test.jsonl``, optional ``DIR/valid.jsonl``, one object a
  line: ``{"text": "...", "label": "spam"}`` (labels all strings or all integers). The classes are the training
  file's labels, sorted (integers numerically); a test label absent from training is refused.
* ``fortunes`` / ``fortunes-topics``: Debian's ``fortunes`` package (/usr/share/games/fortunes), ~15,000
  short quotations in ~40 topic files, entries separated by lines holding ``%``. A small demonstration corpus
  (about 2.5 MB, offline), not a benchmark: numbers on it compare methods within varprune, nothing more.
  Each distinct entry goes to train/valid/test (80/10/10) by a seeded hash of its text (:func:`split_of`):
  whole entries never straddle splits, a duplicate lands where its twin does, and the split depends neither
  on the order of files on disk nor on which other files exist. ``fortunes-topics`` labels an entry by its
  file (the topic); entries found in more than one topic are ambiguous and left out, and topics with fewer
  than :data:`TOPIC_MIN_ENTRIES` entries are left out (too few to test on: ~5 test entries at 50).

Readers are strict: a file that is not UTF-8 (the byte offset is named), empty, not a regular file (a FIFO is
never opened blocking), too large for memory (estimated from its size before reading), or a JSONL line that is
not an object with a string ``text`` and a string or integer ``label`` (the line number is named) is a one-line
:class:`DatasetError`. A UTF-8 byte-order mark is stripped. Nothing is downloaded and nothing is written.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from varprune.data.base import DatasetError, DatasetInfo, DatasetLocation, file_kind, gib
from varprune.data.identity import content_digest, sha256_hex, text_digests
from varprune.device import available_memory

__all__ = [
    "DATASETS",
    "DEBIAN_FORTUNES",
    "SPLIT_FRACTIONS",
    "TOPIC_MIN_ENTRIES",
    "TextCorpus",
    "TextSplit",
    "default_dir",
    "load",
    "locate",
    "parse_fortunes",
    "read_jsonl",
    "read_text",
    "split_of",
]

DEBIAN_FORTUNES = "/usr/share/games/fortunes"
SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # fortunes: train, valid, test
FORTUNES_SEED = 20_251_202  # salts the hash that assigns a fortune to its split
TOPIC_MIN_ENTRIES = 50  # fortunes-topics: a topic with fewer (distinct, unambiguous) entries is left out
TEXT_MEMORY_FACTOR = 3  # reading a text file needs about its size in bytes plus the decoded str (1-2x)
JSONL_MEMORY_FACTOR = 6  # ... and JSONL one Python object per line on top

_LM, _CLS = "language-modeling", "text-classification"
_LM_NAMES = (("train.txt", "valid.txt", "test.txt"), ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"))
_JSONL_NAMES = ("train.jsonl", "valid.jsonl", "test.jsonl")
_WIKITEXT_FOLDERS = ("wikitext-2-raw", "wikitext-103-raw")


def _info(name: str, task: str, layout: str) -> DatasetInfo:
    # channels, size, mean/std, crop and flips mean nothing for text; num_classes is filled in by load()
    return DatasetInfo(name, 0, 0, 0, (), (), 0, False, layout, task=task)


DATASETS = {  # the family's registry lines
    "text": _info(
        "text",
        _LM,
        "DIR/train.txt and DIR/test.txt (optional DIR/valid.txt), or WikiText's wiki.{train,valid,test}.raw",
    ),
    "text-classification": _info(
        "text-classification",
        _CLS,
        'DIR/train.jsonl and DIR/test.jsonl (optional DIR/valid.jsonl), lines {"text": ..., "label": ...}',
    ),
    "fortunes": _info("fortunes", _LM, "fortune files (entries separated by '%' lines) in DIR"),
    "fortunes-topics": _info("fortunes-topics", _CLS, "fortune files (entries separated by '%' lines) in DIR"),
}


@dataclass
class TextSplit:
    """One split: ``text`` (language modeling: the split read whole) or ``texts`` and ``labels``
    (classification: class indices into :attr:`TextCorpus.class_names`). ``file`` names where it came from,
    for messages; ``num_bytes`` is its UTF-8 size (an upper bound on a byte-level BPE's token count);
    ``sha256`` is what the split was read from (data/identity.py: the file's bytes, or for fortunes the
    entries drawn), which a run records and checks again."""

    name: str
    file: str
    num_bytes: int
    text: str | None = None
    texts: list[str] | None = None
    labels: list[int] | None = None
    sha256: str | None = None

    def __len__(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.text or "")


@dataclass
class TextCorpus:
    """What :func:`load` returns: the set's info (``task``, and for classification ``num_classes`` and
    ``class_names``), the splits read (``train``, ``test`` unless ``need_test=False``, ``valid`` where the set
    has one) and where it was read from."""

    info: DatasetInfo
    splits: dict[str, TextSplit]
    source: str

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def task(self) -> str:
        return self.info.task


def default_dir(name: str) -> str:
    if name.startswith("fortunes"):  # $VARPRUNE_FORTUNES: a copy elsewhere
        return os.environ.get("VARPRUNE_FORTUNES", DEBIAN_FORTUNES)
    return os.environ.get("VARPRUNE_DATA", "data")


# ----------------------------------------------------------------- strict reading


def _check_regular(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise DatasetError(f"{path} is {file_kind(st.st_mode)}, not a regular file; put the data file itself there")


def open_regular(path: str | os.PathLike, missing: str = "check --data-dir"):
    """``path`` opened for reading in binary, if it is a regular file; otherwise a one-line DatasetError (``missing``
    is the fix said when it does not exist). A FIFO or device is refused from ``stat`` before it is opened, and
    the file is opened non-blocking and checked again, so nothing here ever blocks."""
    path = Path(path)
    try:
        _check_regular(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DatasetError(f"{path} not found; {missing}") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    f = os.fdopen(fd, "rb")
    try:
        _check_regular(path, os.fstat(f.fileno()))  # swapped between stat and open: still refused
    except DatasetError:
        f.close()
        raise
    return f


def read_bytes(path: str | os.PathLike, factor: int = TEXT_MEMORY_FACTOR) -> bytes:
    """The bytes of a regular, non-empty file that fits in memory (``factor`` x its size must be available),
    or a one-line DatasetError (:func:`open_regular`: nothing here ever blocks)."""
    path = Path(path)
    with open_regular(path) as f:
        st = os.fstat(f.fileno())
        if st.st_size == 0:
            raise DatasetError(f"{path} is empty (0 bytes); fill it, or point at the file that holds the data")
        free = available_memory("cpu")
        if st.st_size * factor > free:
            raise DatasetError(
                f"{path} is too large to read into memory ({gib(st.st_size)}, about {factor}x that is needed, "
                f"{gib(free)} available); use a smaller file or a machine with more memory"
            )
        try:
            return f.read()
        except OSError as e:
            raise DatasetError(f"cannot read {path} ({e.strerror or e}); check the file") from None


def decode_utf8(raw: bytes, path: str | os.PathLike) -> str:
    """``raw`` as text, a leading UTF-8 byte-order mark stripped; not UTF-8 names the byte offset."""
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + bom
        raise DatasetError(
            f"{path} is not UTF-8 text (byte 0x{raw[at]:02x} at byte offset {at}); convert it, "
            f"e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text:
        raise DatasetError(
            f"{path} is empty (nothing but a byte-order mark); fill it, or point at the file that holds the data"
        )
    return text


def read_text(path: str | os.PathLike) -> tuple[str, int]:
    """A whole UTF-8 file (BOM stripped) and its size in bytes; anything wrong is a one-line DatasetError."""
    raw = read_bytes(path)
    return decode_utf8(raw, path), len(raw)


def read_jsonl(path: str | os.PathLike) -> tuple[list[str], list[str | int], list[int]]:
    """Texts, labels and line numbers of a JSONL file of ``{"text": str, "label": str | int}`` objects (blank
    lines skipped; labels all strings or all integers). Any bad line is a DatasetError naming its number."""
    raw = read_bytes(path, JSONL_MEMORY_FACTOR)
    texts: list[str] = []
    labels: list[str | int] = []
    lines: list[int] = []
    for number, line in enumerate(decode_utf8(raw, path).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            reason = getattr(e, "msg", None) or str(e)
            raise DatasetError(
                f'{where} is not JSON ({reason}); each line must be one object {{"text": ..., "label": ...}}'
            ) from None
        if not isinstance(obj, dict):
            raise DatasetError(f'{where} is a JSON {type(obj).__name__}, not an object {{"text": ..., "label": ...}}')
        for field in ("text", "label"):
            if field not in obj:
                raise DatasetError(f"{where} lacks the field {field!r}; every line needs 'text' and 'label'")
        text, label = obj["text"], obj["label"]
        if not isinstance(text, str):
            raise DatasetError(f"{where}: 'text' is a JSON {_json_type(text)}, not a string")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DatasetError(f"{where}: 'label' is a JSON {_json_type(label)}; use a string or an integer")
        if labels and isinstance(label, str) != isinstance(labels[0], str):
            raise DatasetError(
                f"{where}: label {label!r} mixes strings and integers (line {lines[0]} has {labels[0]!r}); use one kind"
            )
        texts.append(text)
        labels.append(label)
        lines.append(number)
    if not texts:
        raise DatasetError(f"{path} holds no examples (only blank lines); it needs one JSON object a line")
    return texts, labels, lines


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(value), "value")


# ----------------------------------------------------------------- text and JSONL folders


def _entry_kind(path: Path) -> str | None:
    """None for a regular file (symlinks followed), else what it is; never opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "unreadable"
    return None if stat.S_ISREG(mode) else file_kind(mode)


def _lm_layout(root: Path) -> tuple[list[tuple[Path, tuple[str, ...]]], str | None]:
    """Every (folder, names) whose training file exists, and a problem to report (None when exactly one)."""
    found: list[tuple[Path, tuple[str, ...]]] = [
        (folder, names)
        for folder in (root, *(root / sub for sub in _WIKITEXT_FOLDERS))
        for names in _LM_NAMES
        if os.path.lexists(folder / names[0])
    ]
    if len(found) > 1:
        which = " and ".join(str(folder / names[0]) for folder, names in found)
        return found, f"{root} holds more than one training text ({which}); keep one, or point --data-dir at one"
    return found, None


def _files(name: str, root: Path, need_test: bool) -> tuple[dict[str, Path], list[str], str | None]:
    """The split files of ``name`` under ``root``: (split -> path of what exists, missing names, problem)."""
    if name == "text":
        found, problem = _lm_layout(root)
        folder, names = found[0] if found else (root, _LM_NAMES[0])
    else:
        folder, names, problem = root, _JSONL_NAMES, None
    files: dict[str, Path] = {}
    missing: list[str] = []
    for split, fname in zip(SPLITS, names):
        path = folder / fname
        if os.path.lexists(path):
            files[split] = path
        elif split == "train" or (split == "test" and need_test):
            missing.append(fname)
    if not need_test:
        files.pop("test", None)
    return files, missing, problem


def _not_found(name: str, root: Path, missing: str) -> str:
    if name.startswith("fortunes"):
        hint = "install them with `apt-get install fortunes`, or point --data-dir at a folder of fortune files"
    elif name == "text":
        hint = (
            "point --data-dir at a folder holding them (for WikiText, unzip wikitext-2-raw-v1.zip and pass "
            "its wikitext-2-raw folder)"
        )
    else:
        hint = "point --data-dir at a folder holding them"
    return f"{name} not found in {root} (missing {missing}; expected {DATASETS[name].layout}): {hint}"


def locate(name: str, root: Path, need_test: bool = True) -> DatasetLocation:
    """Which of ``name``'s files exist under ``root`` (names and ``stat`` only; nothing is opened)."""
    root = Path(root)
    found: list[Path] = []
    missing: list[str] = []
    message = None
    try:
        if name.startswith("fortunes"):
            for path in _fortune_files(root):
                kind = _entry_kind(path)
                (found.append(path) if kind is None else missing.append(f"{path.name} ({kind})"))
            if not found and not missing:
                missing.append("fortune files")
        else:
            files, missing, message = _files(name, root, need_test)
            if message is not None:
                missing.insert(0, "one training text (more than one found)")
            for path in files.values():
                kind = _entry_kind(path)
                (found.append(path) if kind is None else missing.append(f"{path.name} ({kind})"))
    except OSError as e:  # an unreadable folder: nothing found there
        found, missing = [], [f"{root} ({e.strerror or e})"]
    if missing and message is None:
        message = _not_found(name, root, missing[0])
    return DatasetLocation(name, root, found, missing, message)


def _class_order(labels: list) -> list:
    """The label set, sorted: integers numerically, strings by code point (deterministic)."""
    return sorted(set(labels))


def _load_folder(name: str, root: Path, need_test: bool) -> tuple[dict[str, TextSplit], tuple[str, ...]]:
    files, missing, problem = _files(name, root, need_test)
    if problem is not None:
        raise DatasetError(problem)
    if missing:
        raise DatasetError(_not_found(name, root, missing[0]))
    if name == "text":
        splits = {}
        for split, path in files.items():
            raw = read_bytes(path)
            text = decode_utf8(raw, path)
            splits[split] = TextSplit(split, str(path), len(raw), text=text, sha256=sha256_hex(raw))
        return splits, ()
    read = {split: read_jsonl(path) for split, path in files.items()}  # every file checked before use
    classes = _class_order(read["train"][1])
    if len(classes) < 2:  # a model trained on one class learns nothing, and scores 100% on a test of that class
        raise DatasetError(
            f"{files['train']}: every example has the label {classes[0]!r}; classification needs at least two "
            f"classes in the training file"
        )
    try:
        digests = text_digests(files)
    except OSError as e:
        raise DatasetError(f"cannot read {e.filename} again ({e.strerror or e}); check the file") from None
    index = {label: i for i, label in enumerate(classes)}
    splits = {}
    for split, (texts, labels, lines) in read.items():
        for label, number in zip(labels, lines):
            if label not in index:
                shown = ", ".join(repr(c) for c in classes[:8]) + (", ..." if len(classes) > 8 else "")
                raise DatasetError(
                    f"{files[split]} line {number}: label {label!r} does not occur in {files['train']} "
                    f"(its labels: {shown}); a model cannot learn a class it never sees"
                )
        size = files[split].stat().st_size
        splits[split] = TextSplit(
            split, str(files[split]), size, texts=texts, labels=[index[x] for x in labels], sha256=digests[split]
        )
    return splits, tuple(str(c) for c in classes)


# ----------------------------------------------------------------- fortunes


def _fortune_files(root: Path) -> list[Path]:
    """The topic files of a fortunes folder, sorted by name: every visible entry except the ``*.dat`` indexes,
    the ``*.u8`` links and sub-folders (such as ``off/``, which is not read)."""
    out = []
    for entry in sorted(os.listdir(root)):
        path = root / entry
        if entry.startswith(".") or entry.endswith((".dat", ".u8")) or path.is_dir():
            continue
        out.append(path)
    return out


def parse_fortunes(text: str) -> list[str]:
    """The entries of a fortune file: the text between lines holding only ``%``, blank lines around an entry
    dropped (its inner lines, indentation included, kept); empty entries skipped."""
    entries: list[str] = []
    lines: list[str] = []
    for line in [*text.split("\n"), "%"]:
        if line.rstrip("\r") == "%":
            while lines and not lines[-1].strip():
                lines.pop()
            start = next((i for i, x in enumerate(lines) if x.strip()), len(lines))
            if start < len(lines):
                entries.append("\n".join(x.rstrip() for x in lines[start:]))
            lines = []
        else:
            lines.append(line)
    return entries


def split_of(entry: str, seed: int = FORTUNES_SEED) -> str:
    """``train``, ``valid`` or ``test`` for a fortune: sha256(seed, text) read as a number in [0, 1) against
    the cumulative :data:`SPLIT_FRACTIONS`. A function of the entry's text alone."""
    digest = hashlib.sha256(f"{seed}\0{entry}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < SPLIT_FRACTIONS[0]:
        return "train"
    return "valid" if u < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1] else "test"


def _read_fortunes(root: Path) -> dict[str, list[str]]:
    """topic -> its distinct entries, in file order; every topic file read strictly."""
    if not root.is_dir():
        raise DatasetError(_not_found("fortunes", root, "the folder"))
    try:
        paths = _fortune_files(root)
    except OSError as e:
        raise DatasetError(f"cannot list {root} ({e.strerror or e}); check the folder") from None
    if not paths:
        raise DatasetError(_not_found("fortunes", root, "fortune files"))
    topics = {}
    for path in paths:
        text, _ = read_text(path)
        topics[path.name] = list(dict.fromkeys(parse_fortunes(text)))
    return topics


def _load_fortunes(name: str, root: Path) -> tuple[dict[str, TextSplit], tuple[str, ...]]:
    topics = _read_fortunes(root)
    if name == "fortunes":  # every distinct entry, the first occurrence in (file name, position) order
        entries = list(dict.fromkeys(e for topic in topics.values() for e in topic))
        by_split = {s: [e for e in entries if split_of(e) == s] for s in SPLITS}
        splits = {}
        for s, chosen in by_split.items():
            _require_entries(root, s, len(chosen), len(entries))
            text = "\n\n".join(chosen) + "\n"
            splits[s] = TextSplit(s, f"{root} ({s} entries)", len(text.encode()), text=text, sha256=sha256_hex(text))
        return splits, ()
    owners: dict[str, set[str]] = {}
    for topic, entries in topics.items():
        for e in entries:
            owners.setdefault(e, set()).add(topic)
    kept = {t: [e for e in es if len(owners[e]) == 1] for t, es in topics.items()}
    classes = tuple(t for t in sorted(kept) if len(kept[t]) >= TOPIC_MIN_ENTRIES)
    if len(classes) < 2:
        raise DatasetError(
            f"{root} has {len(classes)} topic file(s) with at least {TOPIC_MIN_ENTRIES} entries; "
            f"fortunes-topics needs two or more"
        )
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}  # each split's texts and labels lists, filled below
    labels: dict[str, list[int]] = {s: [] for s in SPLITS}
    splits = {s: TextSplit(s, f"{root} ({s} entries)", 0, texts=texts[s], labels=labels[s]) for s in SPLITS}
    for label, topic in enumerate(classes):
        for e in kept[topic]:
            s = split_of(e)
            texts[s].append(e)
            labels[s].append(label)
            splits[s].num_bytes += len(e.encode())
    for s in splits:
        _require_entries(root, s, len(texts[s]), sum(len(kept[t]) for t in classes))
    for s, split in splits.items():
        split.sha256 = content_digest(texts[s], [classes[i] for i in labels[s]])
    absent = sorted(set(range(len(classes))) - set(labels["train"]))
    if absent:  # not at TOPIC_MIN_ENTRIES: the chance is 0.2**50
        raise DatasetError(f"{root}: topic {classes[absent[0]]!r} has no training entry; remove it from the folder")
    return splits, classes


def _require_entries(root: Path, split: str, n: int, total: int) -> None:
    if n == 0:
        raise DatasetError(f"{root}: no entry falls in the {split} split ({total} entries in all); it needs more")


# ----------------------------------------------------------------- the family's entry points


def load(
    name: str, root: Path, download: bool = False, image_size: int | None = None, need_test: bool = True
) -> TextCorpus:
    """The set as a :class:`TextCorpus` (``image_size`` is meaningless for text and ignored). Without
    ``need_test`` the folder sets read no test file; fortunes always splits every entry."""
    info = DATASETS[name]
    root = Path(root)
    if download:
        raise DatasetError(
            f"{name}: --download is not supported for text (nothing is fetched); get WikiText-2 or -103 raw "
            f"(wikitext-2-raw-v1.zip from the Salesforce/wikitext dataset), unzip it and point --data-dir at "
            f"the folder holding wiki.train.raw"
        )
    if name.startswith("fortunes"):
        splits, classes = _load_fortunes(name, root)
        if not need_test:
            splits.pop("test")
    else:
        splits, classes = _load_folder(name, root, need_test)
    if classes:
        info = dataclasses.replace(info, num_classes=len(classes), class_names=classes)
    return TextCorpus(info, splits, str(root))
