"""Segmentation volumes (NIfTI, read with nibabel), sliced to 2D.

* :func:`read_msd` - the Medical Segmentation Decathlon / nnU-Net layout
  (``dataset.json``, ``imagesTr/``, ``labelsTr/``), sliced along one voxel
  axis and split by volume.
* :func:`read_colin27` - the offline default: the Colin27 T1 MRI and the AAL
  atlas from Debian's ``mricron-data`` package, AAL's 116 regions grouped into
  seven structures, axial slices, the test slices a contiguous slab kept apart
  from the training slices by a gap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from varprune.data.base import DatasetError, data_file, read_text, resize_images
from varprune.data.segcommon import (
    SegSplits,
    _check_size,
    _finish,
    _reason,
    _resize_labels,
    normalise_intensity,
    split_cases,
)

DEBIAN_MRICRON = "/usr/share/mricron/templates"

_NIFTI = (".nii.gz", ".nii")


def _nifti_stem(path: Path) -> str | None:
    name = path.name
    for ending in _NIFTI:
        if name.endswith(ending) and not name.startswith("."):  # '._x.nii.gz': macOS resource forks
            return name[: -len(ending)]
    return None


def _nifti_entries(folder: Path) -> list[tuple[Path, str]]:
    """(path, stem) of the NIfTI files in ``folder``, sorted; a folder named like one is skipped, a FIFO,
    socket or device refused from its stat (never opened: opening a FIFO blocks)."""
    try:
        named = sorted((p, stem) for p in folder.iterdir() if (stem := _nifti_stem(p)) is not None)
    except OSError as e:
        raise DatasetError(f"cannot list {folder} ({_reason(e)}); check the dataset folder") from None
    return [(p, stem) for p, stem in named if data_file(p, "volume")]


def _load_nifti(path: Path, what: str):
    """(nibabel image in closest-canonical orientation, its data as float32)."""
    try:
        import nibabel as nib
    except ImportError:
        raise DatasetError("reading NIfTI needs nibabel: pip install nibabel") from None
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))  # type: ignore[attr-defined]  # nibabel's base class lacks it
    except Exception as e:  # any unreadable or truncated file: one line
        raise DatasetError(f"cannot read {what} {path} ({_reason(e)}); re-fetch or re-export the file") from None
    if not np.isfinite(data).all():
        raise DatasetError(f"{what} {path} holds NaN or infinite values; re-export the file")
    return img, data


def _as_labels(data: np.ndarray, path: Path, num_classes: int, hint: str) -> np.ndarray:
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise DatasetError(f"label file {path} holds non-integer values; labels must be class indices")
    outside = (rounded < 0) | (rounded >= num_classes)
    if outside.any():
        bad = np.unique(rounded[outside])
        raise DatasetError(
            f"label file {path} holds values {bad[:5].astype(int).tolist()} outside the "
            f"{num_classes} declared classes 0..{num_classes - 1}; {hint}"
        )
    return rounded.astype(np.int64)


def _parse_labels(labels, path: Path) -> tuple[str, ...]:
    """dataset.json "labels": MSD {"0": "background", ...} or nnU-Net v2 {"background": 0, ...}."""
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f'{path}: "labels" must be a non-empty object; see the MSD/nnU-Net dataset.json format')
    by_index: dict[int, str] = {}
    msd = all(isinstance(k, str) and re.fullmatch(r"\d+", k.strip()) for k in labels) and all(
        isinstance(v, str) for v in labels.values()
    )
    for key, value in labels.items():
        if msd:
            index, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):
            index, name = value, key
        else:
            raise DatasetError(
                f"{path}: label {key!r}: {value!r} is not a class index (region-based labels "
                f'are not supported); use {{"0": "background", ...}} or {{"background": 0, ...}}'
            )
        if index in by_index:
            raise DatasetError(f'{path}: class index {index} appears twice in "labels"; give each class one index')
        by_index[index] = str(name)
    if sorted(by_index) != list(range(len(by_index))):
        raise DatasetError(
            f"{path}: class indices {sorted(by_index)} are not 0..{len(by_index) - 1}; "
            f"number the classes consecutively from 0 (background)"
        )
    if len(by_index) < 2:
        raise DatasetError(f'{path}: "labels" declares only background; declare at least one foreground class')
    return tuple(by_index[i] for i in range(len(by_index)))


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    if not data_file(path, "dataset description"):
        raise DatasetError(
            f"{path} not found; point at a Medical Segmentation Decathlon / nnU-Net folder "
            f"(dataset.json, imagesTr/, labelsTr/)"
        )
    try:
        meta = json.loads(read_text(path, "fix or re-fetch the file"))  # a byte-order mark is dropped
    except json.JSONDecodeError as e:
        raise DatasetError(f"cannot read {path} ({_reason(e)}); fix or re-fetch the file") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} is not a JSON object; see the MSD/nnU-Net dataset.json format")
    return meta


def _channel_files(folder: Path, case: str) -> list[Path]:
    """nnU-Net's per-channel files <case>_0000.nii.gz, <case>_0001.nii.gz, ... in channel order."""
    found = {}
    pattern = re.compile(re.escape(case) + r"_(\d{4})$")
    for entry, stem in _nifti_entries(folder):
        m = pattern.fullmatch(stem)
        if m:
            found[int(m.group(1))] = entry
    return [found[i] for i in sorted(found)]


def _msd_cases(root: Path, meta: dict) -> list[tuple[str, list[Path], Path]]:
    """(case name, image files (one 3D/4D file or one file per channel), label file) per training case."""
    json_path = root / "dataset.json"
    cases = []
    if "training" in meta:
        entries = meta["training"]
        if not isinstance(entries, list):
            raise DatasetError(f'{json_path}: "training" must be a list of {{"image", "label"}} pairs')
        for i, entry in enumerate(entries):
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("image"), str)
                or not isinstance(entry.get("label"), str)
            ):
                raise DatasetError(
                    f'{json_path}: "training" entry {i} is not an {{"image", "label"}} pair of file names; fix the file'
                )
            image, label = root / entry["image"], root / entry["label"]
            stem = _nifti_stem(image) or image.name
            if data_file(image, "image volume"):
                files = [image]
            else:  # nnU-Net v1 lists "x.nii.gz" but stores x_0000.nii.gz, x_0001.nii.gz, ...
                files = _channel_files(image.parent, stem) if image.parent.is_dir() else []
                if not files:
                    raise DatasetError(
                        f"image {image} (listed in {json_path}) not found; restore it or remove its entry"
                    )
            if not data_file(label, "label volume"):
                raise DatasetError(
                    f"label {label} for image {image.name} (listed in {json_path}) not found; "
                    f"restore it or remove the entry"
                )
            cases.append((stem, files, label))
        return cases

    images, labels = root / "imagesTr", root / "labelsTr"
    for folder in (images, labels):
        if not folder.is_dir():
            raise DatasetError(
                f'{folder} not found and {json_path} has no "training" list; '
                f"put the training volumes in imagesTr/ and labelsTr/"
            )
    ending = meta.get("file_ending")
    if ending is not None and ending not in _NIFTI:
        raise DatasetError(f"{json_path}: file_ending {ending!r} is not supported; convert the data to .nii.gz")
    by_case: dict[str, dict[int | None, Path]] = {}
    for entry, stem in _nifti_entries(images):
        m = re.fullmatch(r"(.+)_(\d{4})", stem)
        case, channel = (m.group(1), int(m.group(2))) if m else (stem, None)
        slot = by_case.setdefault(case, {})
        if channel in slot:
            raise DatasetError(f"{entry} duplicates {slot[channel]} (same case and channel); remove one of them")
        slot[channel] = entry
    label_files = {}
    for entry, stem in _nifti_entries(labels):
        label_files[stem] = entry
    if not by_case:
        raise DatasetError(f"{images} holds no .nii.gz volumes; put the training images there")
    for case, slot in sorted(by_case.items()):
        if None in slot and len(slot) > 1:
            raise DatasetError(
                f"{slot[None]} and {slot[min(k for k in slot if k is not None)]} mix a file without "
                f"and with a _0000 channel suffix for case {case}; keep one naming"
            )
        channels = sorted(k for k in slot if k is not None)
        if channels and channels != list(range(len(channels))):
            raise DatasetError(
                f"case {case} in {images} has channels {channels}, not _0000.._{len(channels) - 1:04d}; "
                f"add the missing channel files"
            )
        if case not in label_files:
            first = slot[None] if None in slot else slot[0]
            raise DatasetError(f"image {first} has no mask {labels / (case + '.nii.gz')}; add it or remove the image")
        cases.append((case, [slot[k] for k in ([None] if None in slot else channels)], label_files.pop(case)))
    if label_files:
        stray = next(iter(label_files.values()))
        raise DatasetError(f"label {stray} has no image in {images}; add the image or remove the label")
    return cases


def read_msd(
    root, axis: int = 2, size=(128, 128), test_fraction: float = 0.2, seed: int = 0, foreground_only: bool = False
) -> SegSplits:
    """Read a Medical Segmentation Decathlon / nnU-Net folder as 2D slices.

    ``root/dataset.json`` gives the classes (``"labels"``: MSD's
    ``{"0": "background", "1": ...}`` or nnU-Net v2's ``{"background": 0, ...}``)
    and the channels (``"modality"`` or ``"channel_names"``; without either, the
    channel count of the first image). The cases are ``"training"``'s
    ``{"image", "label"}`` pairs, or, without that list, ``imagesTr/*.nii.gz``
    paired with ``labelsTr/*.nii.gz`` by name, nnU-Net's ``<case>_0000``,
    ``<case>_0001`` ... files being the channels of one case. A 4-D image's
    last axis is its channels. ``imagesTs/`` (no labels) is not read.

    Each volume is normalised per channel (:func:`normalise_intensity`), cut
    into 2D slices along voxel ``axis`` (0, 1 or 2 of the stored array; for
    RAS-stored data 2 is axial), and every slice is resized to ``size``
    (images bilinear with antialiasing, labels nearest): resizing, not
    padding, so slices of different volumes may be stretched differently.
    Image and label must have the same voxel grid shape (affines are not
    compared). The split is by volume, seeded: ``max(1, round(n *
    test_fraction))`` volumes give all their slices to the test split, the
    others to training, so no volume has slices on both sides.

    All slices are kept by default, empty ones included; with
    ``foreground_only`` training keeps only slices with some foreground (the
    test split always keeps all).
    """
    root = Path(root)
    size = _check_size(size)
    if axis not in (0, 1, 2):
        raise DatasetError(f"axis {axis!r} must be 0, 1 or 2 (the voxel axis to slice along)")
    meta = _read_dataset_json(root)
    json_path = root / "dataset.json"
    if "labels" not in meta:
        raise DatasetError(f'{json_path} has no "labels"; add the class names, e.g. {{"0": "background", ...}}')
    class_names = _parse_labels(meta["labels"], json_path)
    declared = meta.get("channel_names", meta.get("modality"))
    if declared is not None and (not isinstance(declared, dict) or not declared):
        raise DatasetError(f'{json_path}: "modality"/"channel_names" must be a non-empty object')
    channels = len(declared) if declared else None
    cases = _msd_cases(root, meta)
    _, test_ids = split_cases(len(cases), test_fraction, seed, f"{root} (MSD)")
    test_set = set(test_ids)

    train, test = [], []
    for number, (case, files, label_path) in enumerate(cases):
        vols = []
        for f in files:
            _, data = _load_nifti(f, "image")
            if data.ndim == 2:
                data = data[:, :, None]
            if data.ndim == 3:
                data = data[..., None]
            if data.ndim != 4 or (len(files) > 1 and data.shape[3] != 1):
                raise DatasetError(
                    f"image {f} has shape {data.shape}; expected a 3-D volume "
                    f"(or 4-D with channels last in a single file)"
                )
            vols.append(data)
        shapes = {v.shape[:3] for v in vols}
        if len(shapes) > 1:
            raise DatasetError(
                f"the channel files of case {case} ({files[0]}, ...) have different shapes "
                f"{sorted(shapes)}; re-export them on one grid"
            )
        image = np.concatenate(vols, axis=3)
        if channels is None:
            channels = image.shape[3]
        if image.shape[3] != channels:
            raise DatasetError(
                f"image {files[0]} has {image.shape[3]} channel(s), {json_path} declares "
                f'{channels}; fix "modality"/"channel_names" or the image'
            )
        _, label_data = _load_nifti(label_path, "label")
        if label_data.ndim == 4 and label_data.shape[3] == 1:
            label_data = label_data[..., 0]
        if label_data.ndim == 2:
            label_data = label_data[:, :, None]
        if label_data.shape != image.shape[:3]:
            raise DatasetError(
                f"label {label_path} has shape {label_data.shape}, its image {files[0]} "
                f"{image.shape[:3]}; image and label must share one voxel grid"
            )
        labels = _as_labels(
            label_data, label_path, len(class_names), f'declare them in {json_path} "labels" or fix the label file'
        )
        image = np.stack([normalise_intensity(image[..., c]) for c in range(channels)], axis=-1)
        x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, axis, 0))).permute(0, 3, 1, 2)
        y = torch.from_numpy(np.ascontiguousarray(np.moveaxis(labels, axis, 0)))
        x, y = resize_images(x, size), _resize_labels(y, size)
        origin = torch.stack([torch.full((len(x),), number), torch.arange(len(x))], dim=1).to(torch.int64)
        if number in test_set:
            test.append((x, y, origin))
        else:
            if foreground_only:
                keep = (y > 0).flatten(1).any(1)
                x, y, origin = x[keep], y[keep], origin[keep]
            train.append((x, y, origin))
    return _finish(train, test, channels, size, class_names, str(root), [c[0] for c in cases])


# ------------------------------------------------------------- seg folders


AAL_GROUPS = (
    (1, "frontal", ("Precentral", "Frontal", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus")),
    (2, "parietal", ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus", "Paracentral_Lobule")),
    (3, "temporal", ("Heschl", "Temporal")),
    (4, "occipital", ("Calcarine", "Cuneus", "Lingual", "Occipital", "Fusiform")),
    (5, "limbic", ("Insula", "Cingulum", "Hippocampus", "ParaHippocampal", "Amygdala")),
    (6, "deep_grey", ("Caudate", "Putamen", "Pallidum", "Thalamus")),
    (7, "cerebellum", ("Cerebelum", "Vermis")),
)
COLIN27_CLASSES = ("background",) + tuple(name for _, name, _ in AAL_GROUPS)

# Default test slab: axial voxel planes k = 80..103 of the 1 mm Colin27 grid
# (MNI z = +9 .. +32 mm). It holds all structures but the cerebellum (which
# ends at k = 79) while leaving training 27 % or more of every structure's
# voxels (deep grey, k = 59..97, is the tight one).
COLIN27_TEST_SLAB = (80, 104)


def aal_group(name: str) -> int:
    """The structure class (1..7) of an AAL region name, from :data:`AAL_GROUPS`; 0 if none matches."""
    for index, _, prefixes in AAL_GROUPS:
        if any(name == p or name.startswith(p + "_") for p in prefixes):
            return index
    return 0


def colin27_folder(root, brain_only: bool = False) -> tuple[Path | None, str]:
    """The folder holding Colin27's files: ``root`` itself, or ``root/templates`` when ``root`` is the
    mricron package's folder (``/usr/share/mricron``). ``(None, message)`` when neither holds them all:
    the message says where they were looked for and which folder to give."""
    root = Path(root)
    names = ("ch2bet.nii.gz" if brain_only else "ch2.nii.gz", "aal.nii.gz", "aal.nii.txt")
    looked = []
    for folder in (root, root / "templates") if (root / "templates").is_dir() else (root,):
        missing = [n for n in names if not data_file(folder / n, "Colin27 file")]
        if not missing:
            return folder, ""
        looked.append(f"{folder} (missing {', '.join(missing)})")
    return None, (
        f"colin27 not found in {' nor in '.join(looked)}; point --data-dir at the folder that holds "
        f"{', '.join(names[:2])} and {names[2]} (Debian's mricron-data installs them in {DEBIAN_MRICRON}: "
        f"apt-get install mricron-data)"
    )


def read_aal_names(path) -> dict[int, str]:
    """aal.nii.txt ('<index> <name> <code>' per line) as {index: name}."""
    path = Path(path)
    text = read_text(path, "reinstall mricron-data")  # a byte-order mark is dropped
    names = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2 or not parts[0].isdigit() or not 0 < int(parts[0]) < 256:
            raise DatasetError(f"{path} line {lineno} is not '<index> <name> <code>'; reinstall mricron-data")
        names[int(parts[0])] = parts[1]
    if not names:
        raise DatasetError(f"{path} names no regions; reinstall mricron-data")
    return names


def _resample_slices(image: np.ndarray, labels: np.ndarray, size: tuple[int, int], num_classes: int):
    """(S, h, w) float image and int labels -> (S, 1, H, W) uint8 and (S, H, W) int64.

    Centre-padded (zeros, background) to the aspect ratio of ``size``, then
    resampled: the image bilinearly with antialiasing, the labels by majority
    (each class's one-hot map resampled the same way, then argmax; ties go to
    the lower class).
    """
    s, h, w = image.shape
    ratio = size[0] / size[1]
    ph, pw = (h, max(w, round(h / ratio))) if h / w >= ratio else (max(h, round(w * ratio)), w)
    top, left = (ph - h) // 2, (pw - w) // 2
    pad = (left, pw - w - left, top, ph - h - top)
    x = F.pad(torch.from_numpy(image)[:, None], pad)
    y = F.pad(torch.from_numpy(labels), pad)
    out_x = resize_images(x, size)
    out_y = torch.empty((s, *size), dtype=torch.int64)
    for start in range(0, s, 16):  # one-hot in chunks: memory stays small
        chunk = (y[start : start + 16, None] == torch.arange(num_classes)[None, :, None, None]).float()
        chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False, antialias=True)
        out_y[start : start + 16] = chunk.argmax(1)
    return out_x, out_y


def read_colin27(
    root=DEBIAN_MRICRON,
    size=(96, 96),
    gap: int = 8,
    test_slab: tuple[int, int] = COLIN27_TEST_SLAB,
    brain_only: bool = False,
) -> SegSplits:
    """Colin27 T1 MRI with AAL structures: an offline 8-class 2D segmentation task.

    Files, from Debian's ``mricron-data`` in ``root`` (or in ``root/templates``:
    the package's folder ``/usr/share/mricron`` works too): ``ch2.nii.gz`` (the
    whole head; ``ch2bet.nii.gz``, brain only, with ``brain_only``),
    ``aal.nii.gz`` and ``aal.nii.txt``. The whole head is the default because
    it is harder: the network must find the brain among scalp, skull, eyes
    and neck; with the brain extracted, the outline is given away. Image and
    atlas must share one grid (shape and affine), checked.

    Classes: background (also white matter, CSF and everything outside the
    brain) and seven grey-matter structures, AAL regions grouped by name
    (:data:`AAL_GROUPS`, :data:`COLIN27_CLASSES`).

    Slices: axial, one per 1 mm voxel plane k of the (RAS) grid, rows running
    anterior to posterior and columns from the subject's left to right; each
    centre-padded to the aspect ratio of ``size`` and resampled to it (the
    181x217 mm plane at 96x96 is 2.26 mm per pixel). Planes without brain
    after resampling are dropped. The test split is the contiguous slab of
    planes ``test_slab[0] <= k < test_slab[1]`` (default k = 80..103, MNI z =
    +9..+32 mm); training takes the brain planes with ``k < test_slab[0] -
    gap`` or ``k >= test_slab[1] + gap``, so ``gap`` planes on each side of
    the slab are used by neither. ``train_origin[:, 1]``/``test_origin[:, 1]``
    hold k. Defaults give 106 training and 24 test slices (brain planes
    k = 10..155), every structure in training, all but the cerebellum in test.
    """
    size = _check_size(size)
    found, message = colin27_folder(root, brain_only)  # the package's folder above templates/ is accepted
    if found is None:
        raise DatasetError(message)
    root = found
    image_path = root / ("ch2bet.nii.gz" if brain_only else "ch2.nii.gz")
    label_path, names_path = root / "aal.nii.gz", root / "aal.nii.txt"
    try:
        gap, lo, hi = int(gap), int(test_slab[0]), int(test_slab[1])
    except (TypeError, ValueError, IndexError):
        raise DatasetError(f"gap {gap!r} and test_slab {test_slab!r} must be integers (planes)") from None
    if gap < 0 or not lo < hi:
        raise DatasetError(f"test_slab {test_slab!r} must be (start, stop) with start < stop and gap {gap} >= 0")

    names = read_aal_names(names_path)
    lut = np.zeros(256, dtype=np.int64)
    for index, name in names.items():
        group = aal_group(name)
        if group == 0:
            raise DatasetError(
                f"{names_path}: region {index} {name!r} matches no structure in AAL_GROUPS; add its prefix to the table"
            )
        lut[index] = group

    image_nii, image = _load_nifti(image_path, "image")
    label_nii, atlas = _load_nifti(label_path, "label")
    import nibabel as nib

    if image.shape != atlas.shape or image.ndim != 3:
        raise DatasetError(
            f"{image_path} has shape {image.shape}, {label_path} {atlas.shape}; they must be 3-D volumes on one grid"
        )
    if not np.allclose(image_nii.affine, label_nii.affine, atol=1e-3):
        raise DatasetError(
            f"{image_path} and {label_path} have different affines (voxel-to-world maps); they must share one grid"
        )
    if nib.aff2axcodes(image_nii.affine) != ("R", "A", "S"):
        image = np.asarray(nib.as_closest_canonical(image_nii).get_fdata(dtype=np.float32))
        atlas = np.asarray(nib.as_closest_canonical(label_nii).get_fdata(dtype=np.float32))
    atlas = _as_labels(atlas, label_path, 256, "reinstall mricron-data")
    undeclared = sorted(set(np.flatnonzero(np.bincount(atlas.ravel(), minlength=256)).tolist()) - set(names) - {0})
    if undeclared:
        raise DatasetError(
            f"{label_path} holds region values {undeclared[:5]} not named in {names_path}; reinstall mricron-data"
        )
    labels = lut[atlas]
    depth = image.shape[2]
    if not (lo >= 0 and hi <= depth):
        raise DatasetError(f"test_slab {test_slab!r} lies outside the {depth} axial planes; pick planes 0..{depth}")

    brain = np.flatnonzero(labels.any(axis=(0, 1)))
    image = normalise_intensity(image)
    # axial plane k: (x, y) -> rows = y reversed (anterior first), columns = x
    planes_x = np.ascontiguousarray(image[:, ::-1, brain].transpose(2, 1, 0))
    planes_y = np.ascontiguousarray(labels[:, ::-1, brain].transpose(2, 1, 0))
    x, y = _resample_slices(planes_x, planes_y, size, len(COLIN27_CLASSES))
    keep = (y > 0).flatten(1).any(1).numpy()
    k = torch.from_numpy(brain[keep]).to(torch.int64)
    x, y = x[torch.from_numpy(keep)], y[torch.from_numpy(keep)]
    is_test = (k >= lo) & (k < hi)
    is_train = (k < lo - gap) | (k >= hi + gap)
    origin = torch.stack([torch.zeros_like(k), k], dim=1)
    source = f"{image_path} + {label_path}"
    if not is_test.any() or not is_train.any():
        raise DatasetError(
            f"test_slab {test_slab!r} with gap {gap} leaves the "
            f"{'test' if not is_test.any() else 'training'} split without brain planes "
            f"(brain: k = {int(k.min())}..{int(k.max())}); move or shrink the slab"
        )
    return _finish(
        [(x[is_train], y[is_train], origin[is_train])],
        [(x[is_test], y[is_test], origin[is_test])],
        1,
        size,
        COLIN27_CLASSES,
        source,
        [image_path.name],
    )


# ------------------------------------------------------------------ locate
