"""What an image folder holds, listed before any image is decoded: :class:`FileList` (paths and labels of both
splits, and the key the decoded cache is filed under) and the two layouts' listers, ``scan_imagefolder`` and
``scan_tiny_imagenet`` (strict, read no image: every problem is one DatasetError line naming the path).
The layouts, decoding and the cache are described in :mod:`varprune.data.folders`, which reads these lists."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from varprune.data.base import DatasetError, data_file, read_text, refuse_special

FORMAT_VERSION = 1  # of the decoded cache: part of every FileList's key
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
IMAGEFOLDER_LAYOUT = "DIR/train/<class>/<images> and DIR/val/<class>/<images> (or DIR/test/<class>/...)"
TINY_LAYOUT = "DIR/wnids.txt, DIR/train/<wnid>/images/*.JPEG, DIR/val/images/* with DIR/val/val_annotations.txt"


@dataclass
class FileList:
    """What a reader found on disk, before decoding: paths and labels of both splits."""

    reader: str
    root: Path
    train_files: list[Path]
    train_labels: list[int]
    test_files: list[Path]
    test_labels: list[int]
    classes: list[str]
    class_names: list[str]
    test_split: str = "val"
    inputs: list[Path] = field(default_factory=list)  # other files that decide labels (annotations)

    @property
    def num_images(self) -> int:
        return len(self.train_files) + len(self.test_files)

    def cache_key(self, image_size: int) -> str:
        """SHA-256 over reader, root, every file's (relative path, size, mtime) and the settings."""
        h = hashlib.sha256()
        h.update(
            json.dumps(
                {
                    "format": FORMAT_VERSION,
                    "reader": self.reader,
                    "root": str(self.root.resolve()),
                    "image_size": int(image_size),
                    "classes": self.classes,
                    "test_split": self.test_split,
                }
            ).encode()
        )
        for tag, files in (("inputs", self.inputs), ("train", self.train_files), ("test", self.test_files)):
            h.update(f"\0{tag}\0".encode())
            for path in files:
                try:
                    st = path.stat()
                except OSError as e:
                    raise DatasetError(f"cannot read {path} ({e.strerror or e}); check the dataset folder") from None
                h.update(f"{path.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for labels in (self.train_labels, self.test_labels):
            h.update(np.asarray(labels, dtype=np.int64).tobytes())
        return h.hexdigest()


# ----------------------------------------------------------------- listing


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, links followed, hidden entries skipped), sorted. A name with
    an image suffix that is not a regular file (a FIFO, socket, device) is refused from its stat, unopened."""
    out, todo = [], [folder]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for e in entries:
                    if e.name.startswith("."):
                        continue
                    if e.is_dir():
                        todo.append(Path(e.path))
                    elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                        if not e.is_file():  # d_type tells most entries apart without a syscall
                            refuse_special(e.path, "image")
                        out.append(Path(e.path))
        except OSError as e:
            raise DatasetError(f"cannot list {e.filename} ({e.strerror or e}); check the dataset folder") from None
    return sorted(out)


def _subdirs(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p))
    except OSError as e:
        raise DatasetError(f"cannot list {folder} ({e.strerror or e})") from None


def _test_folder(root: Path) -> Path | None:
    for name in ("val", "test"):
        if (root / name).is_dir():
            return root / name
    return None


def _two_classes(classes: list[str], where: Path, what: str) -> None:
    """A classifier of one class predicts it always: it trains to 100% and prunes to 100% and says nothing."""
    if len(classes) < 2:
        found = f"only one {what} ({classes[0]})" if classes else f"no {what}"
        raise DatasetError(f"{where} has {found}: a classifier needs at least two classes; add a {what} per class")


def scan_imagefolder(root: str | os.PathLike) -> FileList:
    """List an ImageFolder tree (see the module docstring); strict, reads no image."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise DatasetError(f"no train folder in {root}: expected {IMAGEFOLDER_LAYOUT}")
    test_dir = _test_folder(root)
    if test_dir is None:
        raise DatasetError(f"no val or test folder in {root}: expected {IMAGEFOLDER_LAYOUT}")
    classes = _subdirs(root / "train")
    if not classes:
        raise DatasetError(f"{root / 'train'} has no class folders: expected {IMAGEFOLDER_LAYOUT}")
    _two_classes(classes, root / "train", "class folder")
    unknown = [c for c in _subdirs(test_dir) if c not in classes]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise DatasetError(f"{test_dir} has classes that train lacks ({shown}): the splits must share class folders")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split_dir, names in ((root / "train", classes), (test_dir, _subdirs(test_dir))):
        files, labels = [], []
        for c in names:
            found = _image_files(split_dir / c)
            if not found:
                raise DatasetError(
                    f"class folder {split_dir / c} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    f"add images or remove the folder"
                )
            files += found
            labels += [index[c]] * len(found)
        splits[split_dir.name] = (files, labels)
    (tf, tl), (vf, vl) = splits["train"], splits[test_dir.name]
    return FileList("imagefolder", root, tf, tl, vf, vl, classes, list(classes), test_dir.name)


def _read_lines(path: Path) -> list[str]:
    return [line for line in read_text(path).splitlines() if line.strip()]  # read_text drops a byte-order mark


def scan_tiny_imagenet(root: str | os.PathLike) -> FileList:
    """List a Tiny ImageNet tree (the official zip's layout); strict, reads no image."""
    root = Path(root)
    if not data_file(root / "wnids.txt", "class list"):
        nested = root / "tiny-imagenet-200"
        if data_file(nested / "wnids.txt", "class list"):
            root = nested
        else:
            raise DatasetError(f"no wnids.txt in {root}: expected {TINY_LAYOUT}")
    wnids = [line.strip() for line in _read_lines(root / "wnids.txt")]
    if len(set(wnids)) != len(wnids):
        raise DatasetError(f"{root / 'wnids.txt'} lists a class twice; re-fetch the dataset")
    _two_classes(wnids, root / "wnids.txt", "class")
    index = {w: i for i, w in enumerate(wnids)}
    names = dict(zip(wnids, wnids))
    words = root / "words.txt"
    if data_file(words, "class name list"):
        for line in _read_lines(words):
            wnid, _, synonyms = line.partition("\t")
            if wnid in names and synonyms.strip():
                names[wnid] = synonyms.split(",")[0].strip()
    train_files, train_labels = [], []
    for w in wnids:
        folder = root / "train" / w / "images"
        if not folder.is_dir():
            raise DatasetError(f"missing {folder} for class {w} of wnids.txt: expected {TINY_LAYOUT}")
        found = _image_files(folder)
        if not found:
            raise DatasetError(f"class folder {folder} holds no images; re-fetch the dataset")
        train_files += found
        train_labels += [index[w]] * len(found)
    ann = root / "val" / "val_annotations.txt"
    if not data_file(ann, "annotation file"):
        raise DatasetError(f"no {ann}: expected {TINY_LAYOUT}")
    first: dict[str, tuple[int, str]] = {}  # a file listed twice: kept with one label (nothing changes), not two
    for n, line in enumerate(_read_lines(ann), 1):
        parts = line.split("\t")
        if len(parts) < 2:
            raise DatasetError(f"{ann} line {n} is not 'file<TAB>wnid<TAB>...'; re-fetch the dataset")
        if parts[1] not in index:
            raise DatasetError(f"{ann} line {n} names class {parts[1]!r}, which wnids.txt lacks")
        m, wnid = first.setdefault(parts[0], (n, parts[1]))
        if wnid != parts[1]:
            raise DatasetError(f"{ann} lists {parts[0]} twice (line {m}: {wnid}, line {n}: {parts[1]}); keep one line")
    labelled = {name: index[wnid] for name, (_, wnid) in first.items()}
    val_files = _image_files(root / "val" / "images")
    if not val_files:
        raise DatasetError(f"no images in {root / 'val' / 'images'}: expected {TINY_LAYOUT}")
    unlabelled = [p.name for p in val_files if p.name not in labelled]
    if unlabelled:
        raise DatasetError(
            f"{root / 'val' / 'images' / unlabelled[0]} has no line in {ann} "
            f"({len(unlabelled)} such files); re-fetch the dataset"
        )
    absent = sorted(set(labelled) - {p.name for p in val_files})
    if absent:
        raise DatasetError(
            f"{ann} lists {absent[0]}, which is not in {root / 'val' / 'images'} "
            f"({len(absent)} missing); re-fetch the dataset"
        )
    inputs = [root / "wnids.txt", ann] + ([words] if data_file(words) else [])
    return FileList(
        "tiny-imagenet",
        root,
        train_files,
        train_labels,
        val_files,
        [labelled[p.name] for p in val_files],
        wnids,
        [names[w] for w in wnids],
        "val",
        inputs,
    )
