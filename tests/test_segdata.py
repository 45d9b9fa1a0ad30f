"""2D segmentation readers: MSD/nnU-Net NIfTI, image/mask folders, Colin27 + AAL.

Every reader runs on a tiny folder the test writes itself; Colin27 also on the
Debian package's real files. Expected values come from independent numpy
computations (float64 percentiles, the files' own pixels, AAL's lobe codes).
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from varprune.data import DatasetError
from varprune.data.segcommon import split_cases
from varprune.data.segmentation import (
    DEBIAN_MRICRON,
    load_segdata,
    locate_segdata,
    read_colin27,
    read_msd,
    read_seg_folder,
)
from varprune.data.volumes import AAL_GROUPS, COLIN27_CLASSES, aal_group, read_aal_names

MRICRON = Path(DEBIAN_MRICRON)
needs_mricron = pytest.mark.skipif(
    not (MRICRON / "aal.nii.gz").is_file(),
    reason=f"Debian mricron-data not installed ({MRICRON} absent): apt-get install mricron-data",
)


def reference_normalise(vol):
    """float64 percentile clip + scale, independent of the reader's float32 code."""
    vol = np.asarray(vol, dtype=np.float64)
    lo, hi = np.percentile(vol[vol != 0], [0.5, 99.5])
    return (np.clip(vol, lo, hi) - lo) / (hi - lo) * 255.0


def save_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))


# ------------------------------------------------------------------- MSD

SHAPE = (12, 10, 6)  # x, y, z: six axial slices of 12x10


def make_case(rng, k, channels=1):
    image = rng.normal(100.0 + 10 * k, 20.0, SHAPE + (channels,)).astype(np.float32)
    image[0, 0, :, :] = 0.0  # some zeros, outside the percentile
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:6, 3:7, 1:5] = 1
    labels[6:9, 1:4, 2:6] = 2
    labels[:, :, 0] = 0  # slice 0 without foreground
    return image, labels


def write_msd(root, n=5, channels=1, layout="msd", labels_json=None, seed=0):
    """MSD (training list, 4-D images) or nnU-Net v2 (_0000 channel files, no list) folder."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases, training = {}, []
    for k in range(n):
        name = f"case{k:03d}"
        image, labels = make_case(rng, k, channels)
        cases[name] = (image, labels)
        if layout == "msd":
            save_nifti(root / "imagesTr" / f"{name}.nii.gz", image if channels > 1 else image[..., 0])
            training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        else:
            for c in range(channels):
                save_nifti(root / "imagesTr" / f"{name}_{c:04d}.nii.gz", image[..., c])
        save_nifti(root / "labelsTr" / f"{name}.nii.gz", labels)
    if layout == "msd":
        meta = {
            "labels": labels_json or {"0": "background", "1": "tumour", "2": "edema"},
            "modality": {str(c): f"MR{c}" for c in range(channels)},
            "training": training,
        }
    else:
        meta = {
            "labels": labels_json or {"background": 0, "tumour": 1, "edema": 2},
            "channel_names": {str(c): f"MR{c}" for c in range(channels)},
            "file_ending": ".nii.gz",
        }
    (root / "dataset.json").write_text(json.dumps(meta))
    return cases


def test_msd_slices_normalises_and_splits_by_volume(tmp_path):
    cases = write_msd(tmp_path, n=5)
    data = read_msd(tmp_path, axis=2, size=(12, 10), test_fraction=0.4, seed=3)
    assert data.class_names == ("background", "tumour", "edema") and data.num_classes == 3
    assert data.channels == 1 and data.size == (12, 10)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    train_vols = set(data.train_origin[:, 0].tolist())
    test_vols = set(data.test_origin[:, 0].tolist())
    assert not train_vols & test_vols and train_vols | test_vols == set(range(5)) and len(test_vols) == 2
    assert len(data.train_x) == 3 * SHAPE[2] and len(data.test_x) == 2 * SHAPE[2]  # every slice of a volume
    names = list(cases)
    for x, y, origin in ((data.train_x, data.train_y, data.train_origin), (data.test_x, data.test_y, data.test_origin)):
        for i, (v, s) in enumerate(origin.tolist()):
            image, labels = cases[names[v]]
            assert data.cases[v] == names[v]
            np.testing.assert_array_equal(y[i].numpy(), labels[:, :, s])
            expected = reference_normalise(image[..., 0])[:, :, s]
            assert np.abs(x[i, 0].numpy().astype(np.float64) - expected).max() <= 0.51
    xs = data.train_x.double() / 255
    assert data.mean[0] == pytest.approx(xs.mean().item()) and data.std[0] == pytest.approx(xs.std(correction=0).item())
    again = read_msd(tmp_path, size=(12, 10), test_fraction=0.4, seed=3)
    assert torch.equal(again.test_origin, data.test_origin)


def test_split_cases_property():
    for n in range(2, 30):
        for fraction in (0.1, 0.2, 0.5, 0.9):
            train, test = split_cases(n, fraction, seed=n, what="x")
            assert sorted(train + test) == list(range(n)) and train and test
            assert len(test) == min(n - 1, max(1, round(n * fraction)))
    assert split_cases(20, 0.2, 1, "x") == split_cases(20, 0.2, 1, "x")
    assert split_cases(20, 0.2, 1, "x") != split_cases(20, 0.2, 2, "x")


def test_msd_multimodal_4d_equals_nnunet_channel_files(tmp_path):
    write_msd(tmp_path / "msd", n=3, channels=2, layout="msd")
    write_msd(tmp_path / "v2", n=3, channels=2, layout="nnunet")
    a = read_msd(tmp_path / "msd", size=(8, 8), test_fraction=0.34)
    b = read_msd(tmp_path / "v2", size=(8, 8), test_fraction=0.34)
    assert a.channels == b.channels == 2 and a.train_x.shape[1:] == (2, 8, 8)
    assert a.class_names == b.class_names == ("background", "tumour", "edema")
    for field in ("train_x", "train_y", "test_x", "test_y", "train_origin"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.train_x[:, 0], a.train_x[:, 1])  # the channels are kept apart
    assert set(a.train_y.unique().tolist()) <= {0, 1, 2}


def test_msd_axis_resize_and_foreground_only(tmp_path):
    write_msd(tmp_path, n=4)
    data = read_msd(tmp_path, axis=0, size=(16, 16), test_fraction=0.25)
    assert data.train_x.shape == (3 * SHAPE[0], 1, 16, 16) and data.test_y.shape == (SHAPE[0], 16, 16)
    assert set(data.train_y.unique().tolist()) == {0, 1, 2}
    full = read_msd(tmp_path, size=(12, 10), test_fraction=0.25)
    fg = read_msd(tmp_path, size=(12, 10), test_fraction=0.25, foreground_only=True)
    assert (fg.train_y > 0).flatten(1).any(1).all()
    assert len(fg.train_x) == int((full.train_y > 0).flatten(1).any(1).sum()) < len(full.train_x)
    assert torch.equal(fg.test_y, full.test_y)  # test keeps every slice


def test_msd_bad_inputs_name_the_file(tmp_path):
    def fresh(name, **kw):
        root = tmp_path / name
        write_msd(root, n=kw.pop("n", 3), **kw)
        return root

    root = fresh("shape")
    save_nifti(root / "labelsTr" / "case001.nii.gz", np.zeros((12, 10, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"labelsTr/case001\.nii\.gz has shape \(12, 10, 5\)"):
        read_msd(root)

    root = fresh("values")
    bad = np.zeros(SHAPE, np.uint8)
    bad[1, 1, 1] = 3
    save_nifti(root / "labelsTr" / "case002.nii.gz", bad)
    with pytest.raises(DatasetError, match=r"case002\.nii\.gz holds values \[3\] outside the 3 declared"):
        read_msd(root)

    root = fresh("nomask", layout="nnunet")
    (root / "labelsTr" / "case001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"image .*imagesTr/case001_0000\.nii\.gz has no mask"):
        read_msd(root)

    root = fresh("garbage")
    (root / "imagesTr" / "case000.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(DatasetError, match=r"cannot read image .*case000\.nii\.gz"):
        read_msd(root)

    root = fresh("truncated", layout="nnunet")
    path = root / "labelsTr" / "case002.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"cannot read label .*case002\.nii\.gz"):
        read_msd(root)

    root = tmp_path / "empty"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a"}}))
    with pytest.raises(DatasetError, match=r"empty/imagesTr holds no \.nii\.gz volumes"):
        read_msd(root)

    with pytest.raises(DatasetError, match=r"holds 1 case\(s\), too few to split"):
        read_msd(fresh("one", n=1, layout="nnunet"))

    with pytest.raises(DatasetError, match=r"dataset\.json: label 'whole'.*region-based"):
        read_msd(fresh("regions", layout="nnunet", labels_json={"background": 0, "whole": [1, 2]}))
    with pytest.raises(DatasetError, match=r"dataset\.json: class indices \[0, 2\] are not 0\.\.1"):
        read_msd(fresh("gaps", labels_json={"0": "background", "2": "b"}))
    with pytest.raises(DatasetError, match=r"dataset\.json not found"):
        read_msd(tmp_path / "nothing")

    root = fresh("channels")
    meta = json.loads((root / "dataset.json").read_text())
    meta["modality"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"case000\.nii\.gz has 1 channel\(s\), .* declares 2"):
        read_msd(root)


# ------------------------------------------------------------ seg folders


def write_folder(root, n=5, mode="RGB", mask="binary", suffix="", image_ext=".png", hw=(9, 11), seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    written = {}
    for k in range(n):
        stem = f"img{k:02d}"
        shape = hw + ((3,) if mode == "RGB" else ())
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        labels = np.zeros(hw, dtype=np.uint8)
        labels[1:5, 2:7] = 1
        if mask == "labels":
            labels[5:8, 6:10] = 2 + k % 2
        Image.fromarray(pixels, mode).save(root / "images" / f"{stem}{image_ext}", quality=95)
        if mask == "binary":
            Image.fromarray(labels * 255, "L").save(root / "masks" / f"{stem}{suffix}.png")
        else:
            pal = Image.fromarray(labels, "P")
            pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
            pal.save(root / "masks" / f"{stem}{suffix}.png")
        written[stem] = (pixels, labels)
    return written


def test_seg_folder_binary_rgb_seeded_split(tmp_path):
    written = write_folder(tmp_path, n=6)
    data = read_seg_folder(tmp_path, size=(9, 11), test_fraction=0.34, seed=1)
    assert data.channels == 3 and data.class_names == ("background", "foreground") and data.num_classes == 2
    assert len(data.test_x) == 2 and len(data.train_x) == 4
    assert not set(data.train_origin[:, 0].tolist()) & set(data.test_origin[:, 0].tolist())
    for x, y, origin in ((data.train_x, data.train_y, data.train_origin), (data.test_x, data.test_y, data.test_origin)):
        for i, (case, _) in enumerate(origin.tolist()):
            pixels, labels = written[data.cases[case]]
            np.testing.assert_array_equal(x[i].permute(1, 2, 0).numpy(), pixels)  # 8-bit kept as is
            np.testing.assert_array_equal(y[i].numpy(), labels)  # 0/255 -> 0/1
    xs = data.train_x.double() / 255
    assert data.mean == pytest.approx(tuple(xs.mean(dim=(0, 2, 3)).tolist()))


def test_seg_folder_isic_suffix_jpeg_gray_and_resize(tmp_path):
    written = write_folder(tmp_path, n=4, mode="L", suffix="_segmentation", image_ext=".jpg")
    (tmp_path / "images" / "img00_superpixels.png").write_bytes(b"skipped, never opened")
    data = read_seg_folder(tmp_path, size=(18, 22), test_fraction=0.25)
    assert data.channels == 1 and data.train_x.shape == (3, 1, 18, 22) and data.test_y.shape == (1, 18, 22)
    assert set(data.cases) == set(written)
    for y, origin in ((data.train_y, data.train_origin), (data.test_y, data.test_origin)):
        for i, (case, _) in enumerate(origin.tolist()):
            labels = written[data.cases[case]][1]
            # exact 2x nearest upsampling: every source pixel becomes a 2x2 block
            np.testing.assert_array_equal(y[i].numpy(), labels.repeat(2, 0).repeat(2, 1))


def test_seg_folder_palette_labels_and_train_test_folders(tmp_path):
    write_folder(tmp_path / "train", n=4, mask="labels", seed=1)
    written_test = write_folder(tmp_path / "test", n=2, mask="labels", seed=2)
    data = read_seg_folder(tmp_path, size=(9, 11))
    assert data.num_classes == 4 and data.class_names == ("background", "class1", "class2", "class3")
    assert len(data.train_x) == 4 and len(data.test_x) == 2
    for i, (case, _) in enumerate(data.test_origin.tolist()):
        np.testing.assert_array_equal(data.test_y[i].numpy(), written_test[data.cases[case]][1])
    named = read_seg_folder(tmp_path, size=(9, 11), class_names=["bg", "a", "b", "c", "d"])
    assert named.num_classes == 5 and torch.equal(named.train_y, data.train_y)
    with pytest.raises(DatasetError, match=r"masks/img01\.png holds label 3 outside the 3 declared"):
        read_seg_folder(tmp_path, class_names=["bg", "a", "b"])


def test_seg_folder_bad_inputs_name_the_file(tmp_path):
    def fresh(name, **kw):
        root = tmp_path / name
        write_folder(root, n=kw.pop("n", 3), **kw)
        return root

    root = fresh("shape")
    Image.fromarray(np.zeros((9, 12), np.uint8), "L").save(root / "masks" / "img01.png")
    with pytest.raises(DatasetError, match=r"mask .*img01\.png is 12x9, its image .*img01\.png 11x9"):
        read_seg_folder(root)

    root = fresh("values")
    gray = np.zeros((9, 11), np.uint8)
    gray[2, 2] = 128
    gray[3, 3] = 255
    Image.fromarray(gray, "L").save(root / "masks" / "img02.png")
    with pytest.raises(DatasetError, match=r"mask .*masks/img02\.png holds values \[128\]"):
        read_seg_folder(root)

    root = fresh("nomask")
    (root / "masks" / "img01.png").unlink()
    with pytest.raises(DatasetError, match=r"image .*images/img01\.png has no mask"):
        read_seg_folder(root)

    root = fresh("stray")
    Image.fromarray(np.zeros((9, 11), np.uint8), "L").save(root / "masks" / "other.png")
    with pytest.raises(DatasetError, match=r"mask .*masks/other\.png has no image"):
        read_seg_folder(root)

    root = fresh("garbage")
    (root / "images" / "img00.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=r"cannot read image .*images/img00\.png"):
        read_seg_folder(root)

    root = fresh("colour")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8), "RGB").save(
        root / "masks" / "img00.png"
    )
    with pytest.raises(DatasetError, match=r"mask .*img00\.png is a colour image"):
        read_seg_folder(root)

    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"empty/images holds no \.png/\.jpg/\.jpeg images"):
        read_seg_folder(root)
    with pytest.raises(DatasetError, match=r"holds 1 case\(s\), too few to split"):
        read_seg_folder(fresh("one", n=1))
    with pytest.raises(DatasetError, match=r"neither images/ \+ masks/ nor train/ \+ test/"):
        read_seg_folder(tmp_path)


# ------------------------------------------------------------- Colin27

AAL_TXT = "1 Precentral_L 2001\n2 Temporal_Sup_R 8112\n3 Thalamus_L 7101\n4 Cerebelum_6_L 9041\n"


def write_fake_colin(root, depth=30, affine=None, txt=AAL_TXT):
    """A tiny head: a 'brain' box with four AAL regions in planes 5..24 of a 16x18xdepth grid."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    head = rng.integers(1, 200, (16, 18, depth)).astype(np.uint8)
    aal = np.zeros((16, 18, depth), np.uint8)
    aal[3:8, 4:9, 5:25] = 1
    aal[8:13, 4:9, 5:25] = 2
    aal[3:8, 9:14, 5:15] = 4
    aal[8:13, 9:14, 10:25] = 3
    save_nifti(root / "ch2.nii.gz", head)
    save_nifti(root / "aal.nii.gz", aal, affine)
    (root / "aal.nii.txt").write_text(txt)
    return head, aal


def test_colin27_gap_and_grouping_on_a_tiny_head(tmp_path):
    _, aal = write_fake_colin(tmp_path)
    data = read_colin27(tmp_path, size=(18, 16), gap=3, test_slab=(12, 17))
    train_k = data.train_origin[:, 1]
    test_k = data.test_origin[:, 1]
    assert test_k.tolist() == list(range(12, 17))  # a contiguous slab
    assert train_k.tolist() == list(range(5, 9)) + list(range(20, 25))  # brain planes only, gap 3 each side
    assert (train_k[:, None] - test_k[None, :]).abs().min() > 3
    groups = {
        1: COLIN27_CLASSES.index("frontal"),
        2: COLIN27_CLASSES.index("temporal"),
        3: COLIN27_CLASSES.index("deep_grey"),
        4: COLIN27_CLASSES.index("cerebellum"),
    }
    lut = np.zeros(256, np.int64)
    for region, group in groups.items():
        lut[region] = group
    for i, k in enumerate(test_k.tolist()):  # 16x18 plane at its own size: rows anterior first, no resampling
        np.testing.assert_array_equal(data.test_y[i].numpy(), lut[aal[:, ::-1, k].T])
    assert data.num_classes == 8 and data.channels == 1


def test_colin27_bad_inputs_name_the_file(tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    write_fake_colin(tmp_path / "affine", affine=shifted)
    with pytest.raises(DatasetError, match=r"ch2\.nii\.gz and .*aal\.nii\.gz have different affines"):
        read_colin27(tmp_path / "affine", test_slab=(12, 17))
    write_fake_colin(tmp_path / "shape")
    save_nifti(tmp_path / "shape" / "aal.nii.gz", np.zeros((16, 18, 29), np.uint8))
    with pytest.raises(DatasetError, match=r"ch2\.nii\.gz has shape \(16, 18, 30\), .*aal\.nii\.gz \(16, 18, 29\)"):
        read_colin27(tmp_path / "shape", test_slab=(12, 17))
    write_fake_colin(tmp_path / "names", txt=AAL_TXT + "5 Nucleus_Mysterious 9999\n")
    with pytest.raises(DatasetError, match=r"aal\.nii\.txt: region 5 'Nucleus_Mysterious' matches no structure"):
        read_colin27(tmp_path / "names", test_slab=(12, 17))
    write_fake_colin(tmp_path / "undeclared", txt=AAL_TXT.replace("4 Cerebelum_6_L 9041\n", ""))
    with pytest.raises(DatasetError, match=r"aal\.nii\.gz holds region values \[4\] not named in .*aal\.nii\.txt"):
        read_colin27(tmp_path / "undeclared", test_slab=(12, 17))
    write_fake_colin(tmp_path / "slab")
    with pytest.raises(DatasetError, match=r"leaves the training split without brain planes"):
        read_colin27(tmp_path / "slab", gap=10, test_slab=(5, 25))
    with pytest.raises(DatasetError, match=r"mricron-data"):
        read_colin27(tmp_path / "nothing")


def test_aal_grouping_table_agrees_with_the_lobe_codes():
    path = MRICRON / "aal.nii.txt"
    if not path.is_file():
        pytest.skip(f"Debian mricron-data not installed ({path} absent): apt-get install mricron-data")
    names = read_aal_names(path)
    codes = {int(line.split()[0]): int(line.split()[2]) for line in path.read_text().splitlines() if line.strip()}
    by_lobe = {
        2: "frontal",
        3: "limbic",
        4: "limbic",
        5: "occipital",
        6: "parietal",
        7: "deep_grey",
        8: "temporal",
        9: "cerebellum",
    }
    assert len(names) == 116
    for index, name in names.items():
        assert COLIN27_CLASSES[aal_group(name)] == by_lobe[codes[index] // 1000], name
    assert sorted(i for i, _, _ in AAL_GROUPS) == list(range(1, 8))


@pytest.fixture(scope="module")
def colin27():
    if not (MRICRON / "ch2.nii.gz").is_file():
        pytest.skip(f"Debian mricron-data not installed ({MRICRON} absent): apt-get install mricron-data")
    return read_colin27()


@needs_mricron
def test_colin27_real_files(colin27):
    data = colin27
    aal = np.asanyarray(nib.load(str(MRICRON / "aal.nii.gz")).dataobj).astype(np.int64)
    head = np.asanyarray(nib.load(str(MRICRON / "ch2.nii.gz")).dataobj).astype(np.float64)
    brain = np.flatnonzero(aal.any(axis=(0, 1)))
    lo, hi, gap = 80, 104, 8
    assert data.test_origin[:, 1].tolist() == [k for k in brain if lo <= k < hi]
    assert data.train_origin[:, 1].tolist() == [k for k in brain if k < lo - gap or k >= hi + gap]
    assert data.train_x.shape[1:] == (1, 96, 96) and data.num_classes == 8
    assert set(data.train_y.unique().tolist()) == set(range(8))  # every structure in training
    assert set(data.test_y.unique().tolist()) == set(range(7))  # all but the cerebellum in test

    # alignment: an independent nearest-neighbour resampling of the 1 mm planes
    codes = {
        int(ln.split()[0]): int(ln.split()[2])
        for ln in (MRICRON / "aal.nii.txt").read_text().splitlines()
        if ln.strip()
    }
    lobe_to_class = {2: 1, 6: 2, 8: 3, 5: 4, 3: 5, 4: 5, 7: 6, 9: 7}
    lut = np.zeros(256, np.int64)
    for index, code in codes.items():
        lut[index] = lobe_to_class[code // 1000]
    norm = reference_normalise(head)
    side = max(head.shape[:2])  # 217: square after padding
    centres = np.floor((np.arange(96) + 0.5) * side / 96).astype(int)
    for split in ("train", "test"):
        x, y, origin = (getattr(data, f"{split}_{f}") for f in ("x", "y", "origin"))
        for i in range(0, len(x), 7):
            k = int(origin[i, 1])
            plane_y = np.zeros((side, side), np.int64)
            plane_x = np.zeros((side, side))
            left = (side - head.shape[0]) // 2
            plane_y[:, left : left + head.shape[0]] = lut[aal[:, ::-1, k].T]
            plane_x[:, left : left + head.shape[0]] = norm[:, ::-1, k].T
            ref_y = plane_y[np.ix_(centres, centres)]
            ref_x = plane_x[np.ix_(centres, centres)]
            assert (y[i].numpy() == ref_y).mean() > 0.9, (split, k)
            assert np.corrcoef(x[i, 0].numpy().ravel(), ref_x.ravel())[0, 1] > 0.9, (split, k)


# ------------------------------------------------------------------ locate


def test_locate_segdata(tmp_path):
    write_msd(tmp_path / "msd", n=2)
    write_folder(tmp_path / "folder", n=2)
    write_fake_colin(tmp_path / "colin")
    for name, root in (("msd", "msd"), ("seg-folder", "folder"), ("colin27", "colin")):
        complete, message = locate_segdata(name, tmp_path / root)
        assert complete, message
        complete, message = locate_segdata(name, tmp_path / "missing")
        assert not complete and str(tmp_path / "missing") in message
    (tmp_path / "msd" / "labelsTr" / "case000.nii.gz").unlink()
    (tmp_path / "msd" / "labelsTr" / "case001.nii.gz").unlink()
    complete, message = locate_segdata("msd", tmp_path / "msd")
    assert not complete and "labelsTr" in message
    assert locate_segdata("colin27", None)[0] == (MRICRON / "aal.nii.txt").is_file()
    with pytest.raises(DatasetError, match="unknown segmentation dataset 'brats'"):
        locate_segdata("brats", tmp_path)
    data = load_segdata("seg-folder", tmp_path / "folder", size=(9, 11), test_fraction=0.5)
    assert len(data.train_x) == len(data.test_x) == 1
