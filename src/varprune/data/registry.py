"""The dataset registry: every name, the family that reads it, and where its files are by default.

A family is a module with ``DATASETS`` (its registry lines: name -> :class:`DatasetInfo`), ``locate(name, root,
need_test)``, ``load(name, root, download, image_size, need_test)`` and ``default_dir(name)``. Adding a dataset
is one reader in its family and one line in that family's ``DATASETS``.
"""

from __future__ import annotations

import os
from pathlib import Path

from varprune.data import folders, instructions, segmentation, text, vision
from varprune.data.base import DatasetError, DatasetInfo, DatasetLocation, ImageData
from varprune.data.text import TextCorpus

FAMILIES = (vision, folders, segmentation, text, instructions)
DATASETS: dict[str, DatasetInfo] = {name: info for family in FAMILIES for name, info in family.DATASETS.items()}
_FAMILY_OF = {name: family for family in FAMILIES for name in family.DATASETS}
FOLDER_SETS = tuple(folders.DATASETS)


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    return DATASETS[name]


def family_of(name: str):
    dataset_info(name)
    return _FAMILY_OF[name]


def default_data_dir(name: str) -> str:
    """Where ``name``'s files are looked for without --data-dir (Debian's packages for the offline defaults)."""
    return family_of(name).default_dir(name)


def _root(name: str, data_dir) -> Path:
    return Path(data_dir if data_dir is not None else default_data_dir(name))


def locate_dataset(name: str, data_dir: str | os.PathLike | None = None, need_test: bool = True) -> DatasetLocation:
    """Which of ``name``'s files exist under ``data_dir`` (or the default folder), reading nothing big; the test
    files only if ``need_test`` (as :func:`load_dataset`)."""
    return family_of(name).locate(name, _root(name, data_dir), need_test)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    need_test: bool = True,
) -> ImageData | TextCorpus:
    """Load a whole dataset on the CPU: images as uint8 tensors (ImageData), text as a TextCorpus.

    Without ``data_dir``, the offline defaults are read from their Debian packages (Fashion-MNIST from
    ``dataset-fashion-mnist``, Colin27 from ``mricron-data``) and the others from ``$VARPRUNE_DATA`` or
    ``./data``. ``need_test=False`` reads the training files only where a layout allows it (MNIST/CIFAR/SVHN);
    ``image_size`` resizes every image once.
    """
    return family_of(name).load(
        name, _root(name, data_dir), download=download, image_size=image_size, need_test=need_test
    )
