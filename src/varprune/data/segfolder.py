"""2D segmentation from image/mask folders (Kvasir-SEG, ISIC): ``images/`` and ``masks/``, optionally under
``train/`` and ``test/``, read with PIL; masks matched to images by stem.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from varprune.data.base import DatasetError, data_file, open_image, resize_images
from varprune.data.segcommon import (
    SegSplits,
    _check_size,
    _finish,
    _reason,
    _resize_labels,
    normalise_intensity,
    split_cases,
)

_IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_MASK_SUFFIXES = ("_segmentation", "_mask")  # ISIC: <stem>_segmentation.png
_LABEL_LIMIT = 64  # label-valued masks: values below this
_FIX = "re-fetch or re-export the file"


def _image_files(folder: Path) -> list[Path]:
    """The images (or masks) in ``folder``; a folder named like one is skipped, a FIFO, socket or device
    refused from its stat (never opened: opening a FIFO blocks)."""
    try:
        names = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_ENDINGS and not p.name.startswith("."))
    except OSError as e:
        raise DatasetError(f"cannot list {folder} ({_reason(e)}); check the dataset folder") from None
    return [p for p in names if data_file(p, "image" if folder.name == "images" else "mask")]


def _pair_folder(images: Path, masks: Path) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every image, matched by stem; strays are errors."""
    for folder in (images, masks):
        if not folder.is_dir():
            raise DatasetError(f"{folder} not found; a segmentation folder needs images/ and masks/ side by side")
    # ISIC 2017 ships <stem>_superpixels.png next to the images: not images of their own
    image_files = [p for p in _image_files(images) if not p.stem.endswith("_superpixels")]
    if not image_files:
        raise DatasetError(f"{images} holds no .png/.jpg/.jpeg images; put the images there")
    by_stem: dict[str, Path] = {}
    for p in image_files:
        if p.stem in by_stem:
            raise DatasetError(f"{p} and {by_stem[p.stem]} share the stem {p.stem!r}; keep one of them")
        by_stem[p.stem] = p
    mask_of: dict[str, Path] = {}
    for m in _image_files(masks):
        stem = m.stem
        if stem not in by_stem:
            for suffix in _MASK_SUFFIXES:
                if stem.endswith(suffix) and stem[: -len(suffix)] in by_stem:
                    stem = stem[: -len(suffix)]
                    break
        if stem not in by_stem:
            raise DatasetError(f"mask {m} has no image in {images}; add the image or remove the mask")
        if stem in mask_of:
            raise DatasetError(f"masks {mask_of[stem]} and {m} both belong to image {by_stem[stem]}; keep one")
        mask_of[stem] = m
    for stem, image in by_stem.items():
        if stem not in mask_of:
            raise DatasetError(
                f"image {image} has no mask in {masks} (expected {stem}.png or "
                f"{stem}_segmentation.png); add it or remove the image"
            )
    return [(stem, by_stem[stem], mask_of[stem]) for stem in sorted(by_stem)]


def _read_image(path: Path) -> np.ndarray:
    """(H, W, C) float32 in 0..255, C = 1 or 3: 8-bit kept, deeper images normalised per image."""
    with open_image(path, "image", fix=_FIX) as img:
        img.load()
        mode = img.mode
        if mode in ("RGB", "L"):
            a = np.asarray(img, dtype=np.float32)
        elif mode in ("1", "LA", "La"):
            a = np.asarray(img.convert("L"), dtype=np.float32)
        elif mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = normalise_intensity(np.asarray(img, dtype=np.float32))
        else:  # RGBA, P, CMYK, YCbCr, ...: as RGB, alpha dropped
            a = np.asarray(img.convert("RGB"), dtype=np.float32)
    return a[..., None] if a.ndim == 2 else a


def _read_mask(path: Path) -> tuple[np.ndarray, str]:
    """(H, W) int64 raw values and their kind: 'labels' (palette, 1-bit), 'jpeg' (thresholded) or 'gray'."""
    with open_image(path, "mask", fix=_FIX) as img:
        img.load()
        if img.format == "JPEG":  # lossy: values near 0/255, threshold them
            return (np.asarray(img.convert("L")) >= 128).astype(np.int64), "jpeg"
        if img.mode in ("P", "1"):
            return np.asarray(img).astype(np.int64), "labels"
        a = np.asarray(img)
    if a.ndim == 3:
        if a.shape[2] in (2, 4):
            a = a[..., :-1]  # drop alpha
        if a.shape[2] == 3 and not ((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()):
            raise DatasetError(
                f"mask {path} is a colour image; save masks as grayscale or palette PNGs "
                f"holding class indices (or 0/255)"
            )
        a = a[..., 0]
    return a.astype(np.int64), "gray"


def read_seg_folder(
    root, size=(128, 128), test_fraction: float = 0.2, seed: int = 0, class_names: Sequence[str] | None = None
) -> SegSplits:
    """Read a 2D image/mask folder (Kvasir-SEG, ISIC, ...).

    Layout: ``root/images/`` and ``root/masks/``, or ``root/train/`` and
    ``root/test/`` each holding both (then the split is theirs; otherwise a
    seeded split of the images, as :func:`split_cases`). Images are
    ``.png/.jpg/.jpeg`` (also ``.bmp/.tif``); masks are matched by stem, the
    mask's stem being the image's or the image's plus ``_segmentation`` (ISIC)
    or ``_mask``. Every image needs its mask and every mask its image; ISIC's
    ``*_superpixels.png`` files are skipped.

    Images: RGB (and palette, RGBA with alpha dropped) give 3 channels,
    grayscale 1; if any image is colour, grayscale ones are replicated to 3.
    8-bit images keep their values; 16-bit and float images are normalised per
    image (:func:`normalise_intensity`).

    Masks, decided over the whole set: values all in {0, 255} are binary
    (255 -> 1); values all below 64 (or palette/1-bit PNGs) are class indices;
    anything else is an error. JPEG masks (Kvasir-SEG) are lossy and are
    thresholded at 128 to 0/1. The number of classes is the largest label + 1,
    or ``len(class_names)`` when given (then labels beyond it are errors).

    Image and mask must have the same size; both are resized to ``size``
    (images bilinear with antialiasing, masks nearest).
    """
    root = Path(root)
    size = _check_size(size)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; point at a folder with images/ and masks/")
    if (root / "train").is_dir() and (root / "test").is_dir():
        groups = {
            "train": _pair_folder(root / "train" / "images", root / "train" / "masks"),
            "test": _pair_folder(root / "test" / "images", root / "test" / "masks"),
        }
        cases = groups["train"] + groups["test"]
        test_set = set(range(len(groups["train"]), len(cases)))
    else:
        if not (root / "images").is_dir():
            raise DatasetError(
                f"{root} has neither images/ + masks/ nor train/ + test/; "
                f"arrange the files as images/<stem>.png and masks/<stem>.png"
            )
        cases = _pair_folder(root / "images", root / "masks")
        _, test_ids = split_cases(len(cases), test_fraction, seed, f"{root} (image/mask folder)")
        test_set = set(test_ids)

    images, masks, kinds, values = [], [], [], []
    for _stem, image_path, mask_path in cases:
        image = _read_image(image_path)
        mask, kind = _read_mask(mask_path)
        if mask.shape != image.shape[:2]:
            raise DatasetError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, its image {image_path} "
                f"{image.shape[1]}x{image.shape[0]} (width x height); they must be the same size"
            )
        values.append(np.unique(mask))
        images.append(resize_images(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None], size))
        masks.append(_resize_labels(torch.from_numpy(mask)[None], size))
        kinds.append(kind)

    gray = [i for i, k in enumerate(kinds) if k == "gray"]
    gray_values = set(np.concatenate([values[i] for i in gray]).tolist()) if gray else set()
    binary = bool(gray_values) and gray_values <= {0, 255} and 255 in gray_values
    if not binary and gray_values and (255 in gray_values or max(gray_values) >= _LABEL_LIMIT):
        # blame the first mask that breaks the reading most masks suggest
        some_binary = 255 in gray_values
        for i in gray:
            bad = [int(v) for v in values[i] if (v not in (0, 255) if some_binary else v >= _LABEL_LIMIT)]
            if bad:
                raise DatasetError(
                    f"mask {cases[i][2]} holds values {bad[:4]}: masks must be binary 0/255 or "
                    f"class indices below {_LABEL_LIMIT} across the whole set; re-export the masks"
                )
    for i in gray:
        if binary:
            masks[i] = (masks[i] == 255).to(torch.int64)
            values[i] = (values[i] == 255).astype(np.int64)
    largest = max(int(v.max(initial=0)) for v in values)
    if class_names is not None:
        names = tuple(str(c) for c in class_names)
        if len(names) < 2:
            raise DatasetError(f"class_names {names} must name background and at least one class")
        for i, v in enumerate(values):
            if v.max(initial=0) >= len(names):
                raise DatasetError(
                    f"mask {cases[i][2]} holds label {int(v.max())} outside the {len(names)} "
                    f"declared classes; pass more class_names or fix the mask"
                )
    elif largest <= 1:
        names = ("background", "foreground")
    else:
        names = ("background",) + tuple(f"class{c}" for c in range(1, largest + 1))

    channels = max(int(x.shape[1]) for x in images)
    train: list[tuple] = []
    test: list[tuple] = []
    for number, (x, y) in enumerate(zip(images, masks)):
        if x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        origin = torch.tensor([[number, 0]], dtype=torch.int64)
        (test if number in test_set else train).append((x, y, origin))
    return _finish(train, test, channels, size, names, str(root), [c[0] for c in cases])


# ----------------------------------------------------------------- Colin27

# AAL's 116 regions grouped into seven structures by name prefix (a region
# name is PREFIX or PREFIX_..., then _L/_R). The grouping follows AAL's own
# lobe codes (third column of aal.nii.txt: 2xxx frontal, 3xxx insula,
# 4xxx limbic, 5xxx occipital, 6xxx parietal, 7xxx central nuclei,
# 8xxx temporal, 9xxx cerebellum), insula joined with the limbic regions.
#
#   class  structure     AAL name prefixes
