"""The segmentation family: MSD / nnU-Net volumes, image/mask folders, and Colin27 (the offline default).

Readers live in volumes.py (NIfTI) and segfolder.py (PNG/JPEG folders) and return
:class:`~varprune.data.segcommon.SegSplits`; this module registers the three sets, says cheaply whether a
set is complete (:func:`locate_segdata`, listing files, reading nothing big) and turns the splits into the
:class:`~varprune.data.base.ImageData` every task reads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from varprune.data.base import DatasetError, DatasetInfo, DatasetLocation, ImageData, data_file, refuse_special
from varprune.data.segcommon import SegSplits
from varprune.data.segfolder import _IMAGE_ENDINGS, read_seg_folder
from varprune.data.volumes import _NIFTI, DEBIAN_MRICRON, colin27_folder, read_colin27, read_msd

SEG_DATASETS = ("msd", "seg-folder", "colin27")
# shape and classes are read from the data: these are placeholders that load() fills in. Crops shift image and
# mask together (tasks.augment.crop_flip).
DATASETS = {
    name: DatasetInfo(name, 0, 0, 0, (), (), 4 if name == "colin27" else 8, True, layout, task="segmentation")
    for name, layout in (
        ("msd", "DIR/dataset.json, DIR/imagesTr/*.nii.gz, DIR/labelsTr/*.nii.gz (MSD / nnU-Net)"),
        ("seg-folder", "DIR/images/*.png|jpg and DIR/masks/*.png (or DIR/train/... and DIR/test/...)"),
        ("colin27", "ch2.nii.gz, aal.nii.gz, aal.nii.txt (Debian package mricron-data)"),
    )
}


def default_dir(name: str) -> str:
    return DEBIAN_MRICRON if name == "colin27" else os.environ.get("VARPRUNE_DATA", "data")


def _has_files(folder: Path, endings: tuple[str, ...]) -> bool:
    """Whether ``folder`` holds files with these endings; a FIFO, socket or device so named: DatasetError."""
    try:
        with os.scandir(folder) as it:
            named = [e for e in it if e.name.lower().endswith(endings) and not e.name.startswith(".")]
    except OSError:
        return False
    for e in named:
        if not e.is_file() and not e.is_dir():  # d_type alone for most entries: no syscall
            refuse_special(e.path)
    return any(e.is_file() for e in named)


def default_seg_root(name: str) -> str | None:
    """Colin27's default folder (the Debian package); the others have none."""
    return DEBIAN_MRICRON if name == "colin27" else None


def locate_segdata(name: str, root=None) -> tuple[bool, str]:
    """Whether segmentation set ``name`` looks complete under ``root``, cheaply.

    Checks that the expected files and folders exist (listing folders, reading
    nothing big) and returns ``(complete, message)``: the message says what
    was found, or what is missing and how to fix it. Unknown names raise
    :class:`DatasetError`.
    """
    if name not in SEG_DATASETS:
        raise DatasetError(f"unknown segmentation dataset {name!r}; choose one of: {', '.join(SEG_DATASETS)}")
    if root is None:
        root = default_seg_root(name)
        if root is None:
            return False, f"{name}: no folder given; pass --data-dir pointing at the data"
    try:
        return _locate_segdata(name, Path(root))
    except DatasetError as e:  # a FIFO where a file should be, an unreadable folder
        return False, f"{name}: {e}"


def _locate_segdata(name: str, root: Path) -> tuple[bool, str]:
    if name == "colin27":
        found, message = colin27_folder(root)  # root, or root/templates (the package's folder)
        if found is None:
            return False, message
        return True, f"colin27: ch2.nii.gz, aal.nii.gz and aal.nii.txt in {found}"
    if name == "msd":
        if not data_file(root / "dataset.json", "dataset description"):
            return False, f"msd: {root / 'dataset.json'} missing; point at an MSD/nnU-Net task folder"
        for sub in ("imagesTr", "labelsTr"):
            if not _has_files(root / sub, _NIFTI):
                return False, f"msd: {root / sub} missing or without .nii.gz files; restore the training volumes"
        return True, f"msd: dataset.json, imagesTr/ and labelsTr/ in {root}"
    bases = [root / "train", root / "test"] if (root / "train").is_dir() and (root / "test").is_dir() else [root]
    for base in bases:
        for sub in ("images", "masks"):
            if not _has_files(base / sub, _IMAGE_ENDINGS):
                return False, (
                    f"seg-folder: {base / sub} missing or without images; arrange the data as "
                    f"images/<stem>.png + masks/<stem>.png (optionally under train/ and test/)"
                )
    return True, f"seg-folder: images/ and masks/ in {', '.join(str(b) for b in bases)}"


def load_segdata(name: str, root=None, **options) -> SegSplits:
    """Read segmentation set ``name`` ('msd', 'seg-folder', 'colin27') with the reader's ``options``."""
    if name not in SEG_DATASETS:
        raise DatasetError(f"unknown segmentation dataset {name!r}; choose one of: {', '.join(SEG_DATASETS)}")
    if root is None:
        root = default_seg_root(name)
        if root is None:
            raise DatasetError(f"{name}: no folder given; pass --data-dir pointing at the data")
    readers: dict[str, Callable[..., SegSplits]] = {
        "msd": read_msd,
        "seg-folder": read_seg_folder,
        "colin27": read_colin27,
    }
    return readers[name](root, **options)


def locate(name: str, root: Path, need_test: bool = True) -> DatasetLocation:
    complete, message = locate_segdata(name, root)
    return DatasetLocation(name, root, [root] if complete else [], [] if complete else [message], None)


def load(
    name: str, root: Path, download: bool = False, image_size: int | None = None, need_test: bool = True
) -> ImageData:
    """A segmentation set as ImageData: images uint8 (N, C, H, W), label maps int64 (N, H, W)."""
    info = DATASETS[name]
    if not root.exists():
        raise DatasetError(
            f"{info.name} not found: {root} does not exist (expected {info.layout}); point --data-dir at it"
        )
    seg = load_segdata(info.name, root, **({"size": (image_size, image_size)} if image_size else {}))
    h, w = seg.size
    if h != w:
        raise DatasetError(f"{info.name} slices are {h}x{w}; varprune's models take square inputs")
    resolved = dataclasses.replace(
        info,
        channels=seg.channels,
        size=h,
        num_classes=seg.num_classes,
        mean=tuple(seg.mean),
        std=tuple(max(s, 1e-3) for s in seg.std),
        class_names=tuple(seg.class_names),
    )
    return ImageData(resolved, seg.train_x, seg.train_y, seg.test_x, seg.test_y, seg.source)
