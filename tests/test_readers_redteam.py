"""The red team's data-reader findings (and one of the HTML report): each test failed before its fix.

1. a FIFO (or socket, device) named like data is refused by the listing, never opened: no reader hangs;
2. one rule for images too large to decode (Pillow's decompression-bomb limit) in every image reader;
3. Tiny-ImageNet's val_annotations.txt naming one file twice with two labels is refused;
4. a UTF-8 byte-order mark at the start of a text file the readers read is not part of the data;
5. colin27 accepts the mricron package folder (the parent of templates/);
6. fashion-mnist --download uses complete files as they are and leaves no folder behind when it fails;
7. the study page puts each table's title directly above its own table.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import cli, one_line_error
from test_data import write_fake_mnist
from test_folderdata import _folder, _tiny
from test_segdata import AAL_TXT, write_fake_colin, write_folder, write_msd
from varprune.data import DatasetError, locate_dataset
from varprune.data.folders import (
    read_imagefolder,
    read_tiny_imagenet,
    scan_imagefolder,
    scan_tiny_imagenet,
)
from varprune.data.segmentation import locate_segdata, read_colin27, read_msd, read_seg_folder
from varprune.data.streaming import streaming_info
from varprune.data.vision import load as vision_load
from varprune.data.volumes import read_aal_names

SRC = str(Path(__file__).resolve().parents[1] / "src")
BOM = "\ufeff"


# ------------------------------------------------------------------ 1. FIFOs are refused, nothing hangs


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


def _unblock(fifo: Path) -> None:
    """Open the FIFO for writing and close it: a reader blocked opening it gets end-of-file and goes on."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _refusal(read, fifo: Path, timeout: float = 15.0) -> str:
    """Run ``read()`` in a daemon thread: it must raise one DatasetError naming the FIFO, within ``timeout``."""
    box: dict = {}

    def target():
        try:
            read()
            box["error"] = None
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        _unblock(fifo)
        t.join(10)
        pytest.fail(f"the reader hung on the FIFO {fifo} (unblocked after {timeout:g} s)")
    e = box["error"]
    assert isinstance(e, DatasetError), repr(e)
    message = str(e)
    assert str(fifo) in message and "FIFO" in message and "\n" not in message, message
    return message


def _tiny_fifo(tmp_path):
    _tiny(tmp_path / "t")
    return tmp_path / "t", _fifo(tmp_path / "t" / "train" / "n02" / "images" / "n02_9.JPEG")


def _seg_fifo_image(tmp_path):
    write_folder(tmp_path / "s", n=3)
    Image.new("L", (11, 9)).save(tmp_path / "s" / "masks" / "img09.png")
    return tmp_path / "s", _fifo(tmp_path / "s" / "images" / "img09.png")


def _seg_fifo_mask(tmp_path):
    write_folder(tmp_path / "s", n=3)
    return tmp_path / "s", _fifo(tmp_path / "s" / "masks" / "img01.png")


def _msd_fifo(tmp_path):
    write_msd(tmp_path / "m", n=3, layout="nnunet")
    return tmp_path / "m", _fifo(tmp_path / "m" / "imagesTr" / "case001_0000.nii.gz")


def _msd_json_fifo(tmp_path):
    write_msd(tmp_path / "m", n=3)
    return tmp_path / "m", _fifo(tmp_path / "m" / "dataset.json")


def _colin_fifo(tmp_path):
    write_fake_colin(tmp_path / "c")
    return tmp_path / "c", _fifo(tmp_path / "c" / "aal.nii.gz")


FIFO_CASES = {
    "imagefolder": (
        lambda tmp: (_folder(tmp / "d"), tmp / "d", _fifo(tmp / "d" / "train" / "dog" / "x.png"))[1:],
        lambda root: read_imagefolder(root, image_size=8, cache=False, workers=1),
    ),
    "tiny-imagenet": (_tiny_fifo, lambda root: read_tiny_imagenet(root, cache=False, workers=1)),
    "tiny-imagenet-wnids": (
        lambda tmp: (_tiny(tmp / "t"), tmp / "t", _fifo(tmp / "t" / "wnids.txt"))[1:],
        scan_tiny_imagenet,
    ),
    "seg-folder-image": (_seg_fifo_image, read_seg_folder),
    "seg-folder-mask": (_seg_fifo_mask, read_seg_folder),
    "msd-volume": (_msd_fifo, read_msd),
    "msd-dataset.json": (_msd_json_fifo, read_msd),
    "colin27": (_colin_fifo, lambda root: read_colin27(root, size=(18, 16), gap=3, test_slab=(12, 17))),
}


@pytest.mark.parametrize("case", sorted(FIFO_CASES))
def test_a_fifo_named_like_data_is_refused_without_opening_it(tmp_path, case):
    make, read = FIFO_CASES[case]
    root, fifo = make(tmp_path)
    message = _refusal(lambda: read(root), fifo)
    assert "regular file" in message, message


def test_a_fifo_is_refused_by_the_listing_and_the_cheap_check(tmp_path):
    _folder(tmp_path / "d")
    fifo = _fifo(tmp_path / "d" / "val" / "emu" / "y.png")
    _refusal(lambda: scan_imagefolder(tmp_path / "d"), fifo)
    loc = locate_dataset("imagefolder", tmp_path / "d")
    assert not loc.complete and str(fifo) in loc.not_found_message()
    write_folder(tmp_path / "s", n=3)
    fifo = _fifo(tmp_path / "s" / "masks" / "img02.png")
    complete, message = locate_segdata("seg-folder", tmp_path / "s")
    assert not complete and str(fifo) in message and "FIFO" in message


def test_train_on_a_folder_with_a_fifo_exits_2_at_once(tmp_path):
    """The red team's case through the command line, in a process of its own (a hang is killed, not waited on)."""
    _folder(tmp_path / "d", size=(8, 8))
    fifo = _fifo(tmp_path / "d" / "train" / "cat" / "x.png")
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    args = ["train", "--dataset", "imagefolder", "--data-dir", tmp_path / "d", "--model", "mlp", "--epochs", "1"]
    args += ["--image-size", "8", "--device", "cpu", "--quiet", "--out", run]
    try:
        r = subprocess.run(
            [sys.executable, "-m", "varprune", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
        )
    except subprocess.TimeoutExpired:
        _unblock(fifo)
        pytest.fail("varprune train hung on a FIFO named x.png")
    line = one_line_error(r.returncode, r.stderr)
    assert str(fifo) in line and "FIFO" in line, line
    assert not run.exists()


# ------------------------------------------------------------------ 2. one rule for huge images


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A 20000 x 20000 PNG of one colour: 50 KB on disk, 400 million pixels (over Pillow's limit)."""
    path = tmp_path_factory.mktemp("bomb") / "big.png"
    Image.new("1", (20000, 20000)).save(path)
    return path


def _bomb_message(e: DatasetError, path: Path) -> str:
    message = str(e)
    assert str(path) in message and "400,000,000 pixels" in message and "\n" not in message, message
    return message[message.index(str(path)) + len(str(path)) :]  # the part after the file name


def test_every_image_reader_refuses_a_decompression_bomb_the_same_way(tmp_path, bomb):
    tails = {}
    write_folder(tmp_path / "s", n=3)
    target = tmp_path / "s" / "images" / "img01.png"
    shutil.copy(bomb, target)
    with pytest.raises(DatasetError) as e:
        read_seg_folder(tmp_path / "s")
    tails["seg-folder image"] = _bomb_message(e.value, target)
    shutil.copy(tmp_path / "s" / "images" / "img00.png", target)
    target = tmp_path / "s" / "masks" / "img02.png"
    shutil.copy(bomb, target)
    with pytest.raises(DatasetError) as e:
        read_seg_folder(tmp_path / "s")
    tails["seg-folder mask"] = _bomb_message(e.value, target)

    _folder(tmp_path / "d")
    target = tmp_path / "d" / "train" / "dog" / "big.png"
    shutil.copy(bomb, target)
    with pytest.raises(DatasetError) as e:
        read_imagefolder(tmp_path / "d", image_size=8, cache=False, workers=1)
    tails["imagefolder"] = _bomb_message(e.value, target)
    with pytest.raises(DatasetError) as e:
        streaming_info(scan_imagefolder(tmp_path / "d"), 8, workers=1)
    tails["streaming"] = _bomb_message(e.value, target)
    assert len(set(tails.values())) == 1, tails


def test_seg_folder_train_with_a_huge_png_is_one_line(tmp_path, capsys, bomb):
    write_folder(tmp_path / "s", n=4)
    shutil.copy(bomb, tmp_path / "s" / "images" / "img03.png")
    args = ["--model", "unet", "--epochs", "1", "--image-size", "16", "--device", "cpu", "--quiet"]
    rc, _, err = cli(capsys, "train", "--dataset", "seg-folder", "--data-dir", tmp_path / "s", *args, "--out", "run")
    line = one_line_error(rc, err)
    assert "img03.png" in line and "400,000,000 pixels" in line, line
    assert not Path("run").exists()


# ------------------------------------------------------------------ 3. one val file, two labels


def test_tiny_imagenet_refuses_a_val_file_listed_with_two_labels(tmp_path):
    _tiny(tmp_path / "t")
    ann = tmp_path / "t" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_1.JPEG\tn02\t0\t0\t10\t10\n")  # line 2 says n01
    with pytest.raises(DatasetError, match=r"val_annotations\.txt lists val_1\.JPEG twice .*line 2.*n01.*line 5.*n02"):
        scan_tiny_imagenet(tmp_path / "t")
    assert "twice" in locate_dataset("tiny-imagenet", tmp_path / "t").not_found_message()


def test_tiny_imagenet_accepts_a_val_file_listed_twice_with_one_label(tmp_path):
    """Accepted: the repeated line says nothing new, and the image is read once (val/images is listed, not the
    annotation lines), so neither the labels nor the counts change."""
    _tiny(tmp_path / "t")
    ann = tmp_path / "t" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_1.JPEG\tn01\t1\t1\t9\t9\n")
    listing = scan_tiny_imagenet(tmp_path / "t")
    assert [p.name for p in listing.test_files] == [f"val_{i}.JPEG" for i in range(4)]
    assert listing.test_labels == [2, 0, 1, 2]


# ------------------------------------------------------------------ 4. byte-order marks


def test_a_byte_order_mark_is_not_part_of_tiny_imagenets_names(tmp_path):
    _tiny(tmp_path / "t")
    for name in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
        path = tmp_path / "t" / name
        path.write_bytes(BOM.encode() + path.read_bytes())
    words = tmp_path / "t" / "words.txt"  # the first line names a class: its id must match after the mark
    words.write_bytes(BOM.encode() + b"n01\tgoldfish\nn02\ttabby\n")
    listing = scan_tiny_imagenet(tmp_path / "t")
    assert listing.classes == ["n01", "n02", "n03"] and listing.class_names == ["goldfish", "tabby", "n03"]
    assert listing.test_labels == [2, 0, 1, 2]
    assert all(BOM not in str(p) for p in listing.train_files + listing.test_files)


def test_a_byte_order_mark_in_aal_names_and_dataset_json(tmp_path):
    (tmp_path / "aal.nii.txt").write_text(BOM + AAL_TXT, encoding="utf-8")
    assert read_aal_names(tmp_path / "aal.nii.txt")[1] == "Precentral_L"
    write_msd(tmp_path / "m", n=3)
    path = tmp_path / "m" / "dataset.json"
    path.write_text(BOM + path.read_text(), encoding="utf-8")
    assert read_msd(tmp_path / "m").class_names == ("background", "tumour", "edema")
    write_fake_colin(tmp_path / "c", txt=BOM + AAL_TXT)
    assert read_colin27(tmp_path / "c", size=(18, 16), gap=3, test_slab=(12, 17)).num_classes == 8


# ------------------------------------------------------------------ 5. colin27 from the package folder


def test_colin27_accepts_the_folder_above_templates(tmp_path):
    write_fake_colin(tmp_path / "mricron" / "templates")
    complete, message = locate_segdata("colin27", tmp_path / "mricron")
    assert complete, message
    assert str(tmp_path / "mricron" / "templates") in message
    assert locate_dataset("colin27", tmp_path / "mricron").complete
    data = read_colin27(tmp_path / "mricron", size=(18, 16), gap=3, test_slab=(12, 17))
    assert data.source.startswith(str(tmp_path / "mricron" / "templates" / "ch2.nii.gz"))


def test_colin27_elsewhere_says_where_it_looked(tmp_path):
    (tmp_path / "mricron" / "templates").mkdir(parents=True)
    complete, message = locate_segdata("colin27", tmp_path / "mricron")
    assert not complete
    assert str(tmp_path / "mricron") in message and str(tmp_path / "mricron" / "templates") in message, message
    assert "/usr/share/mricron/templates" in message and "--data-dir" in message, message
    with pytest.raises(DatasetError) as e:
        read_colin27(tmp_path / "mricron")
    assert str(tmp_path / "mricron" / "templates") in str(e.value) and "--data-dir" in str(e.value)


@pytest.mark.skipif(not Path("/usr/share/mricron/templates/aal.nii.gz").is_file(), reason="mricron-data absent")
def test_colin27_from_the_debian_package_folder():
    complete, message = locate_segdata("colin27", "/usr/share/mricron")
    assert complete, message


# ------------------------------------------------------------------ 6. --download


@pytest.fixture
def offline(monkeypatch):
    """torchvision's downloads fail as they would without a network (its folder handling runs for real)."""
    import torchvision.datasets.utils as tvu

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(tvu, "_get_redirect_url", unreachable)
    monkeypatch.setattr(tvu, "_urlretrieve", unreachable)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_download_uses_complete_files_as_they_are(tmp_path, offline, layout):
    files = write_fake_mnist(tmp_path / "fm", layout=layout)
    before = _tree(tmp_path)
    data = vision_load("fashion-mnist", tmp_path / "fm", download=True)
    assert data.train_x.shape == (30, 1, 28, 28)
    assert np.array_equal(data.test_y.numpy(), files["t10k-labels-idx1-ubyte"])
    assert _tree(tmp_path) == before


def test_a_failed_download_into_a_new_folder_leaves_nothing(tmp_path, offline):
    with pytest.raises(DatasetError, match="downloading fashion-mnist into .* failed"):
        vision_load("fashion-mnist", tmp_path / "new" / "data", download=True)
    assert not (tmp_path / "new").exists()


def test_a_failed_download_removes_only_the_folders_it_made(tmp_path, offline):
    root = tmp_path / "data"
    (root / "FashionMNIST").mkdir(parents=True)  # the user's, empty: stays
    (root / "other").mkdir()
    (root / "other" / "keep.txt").write_text("mine")
    before = _tree(tmp_path)
    with pytest.raises(DatasetError, match="failed"):
        vision_load("fashion-mnist", root, download=True)
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------ 7. study page: each title above its table


def _study(folder: Path) -> Path:
    folder.mkdir()
    summary = {
        "metric": "accuracy",
        "study": {
            "methods": ["sgd", "var"],
            "seeds": [0],
            "sparsities": [0.9],
            "scope": "global",
            "bnt_batches": 2,
            "bnt_batch_size": 64,
            "train": {"model": "mlp", "dataset": "fashion-mnist", "epochs": 1},
        },
        "methods": {
            m: {
                "dense": [0.9, 0.0],
                "sparsities": {"0.9": {"accuracy_bnt": [0.8 + k / 100, 0.01], "accuracy": [0.5 + k / 100, 0.02]}},
                "time_vs_sgd": None if m == "sgd" else 1.5,
            }
            for k, m in enumerate(["sgd", "var"])
        },
    }
    (folder / "report.json").write_text(json.dumps(summary))
    Image.new("RGB", (4, 4)).save(folder / "report.png")
    return folder


def test_study_page_puts_each_title_directly_above_its_table(tmp_path):
    from varprune.report.pages import study_html

    study_html(_study(tmp_path / "study"), tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    after, before = page.index("after BN re-tuning"), page.index("before BN re-tuning")
    cell_after, cell_before = page.index("80.00 ± 1.00"), page.index("50.00 ± 2.00")
    assert after < cell_after < before < cell_before, (after, cell_after, before, cell_before)
    tables = re.findall(r"<table>.*?</table>", page, re.S)
    assert len(tables) == 2
    assert "after BN re-tuning" in tables[0] and "80.00 ± 1.00" in tables[0] and "before BN" not in tables[0]
    assert "before BN re-tuning" in tables[1] and "50.00 ± 2.00" in tables[1] and "after BN" not in tables[1]
    for table in tables:  # the title is the table's first child, drawn above it
        assert re.match(r"<table>\s*<caption class=title>", table), table[:80]
    assert re.search(r"caption\.title\s*\{[^}]*caption-side:\s*top", page)


def test_fifos_named_like_the_idx_files_are_named_not_missing(tmp_path, capsys):
    """A FIFO where a dataset file should be: the message names it, instead of calling the dataset missing."""
    from varprune.cli import main

    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        os.mkfifo(tmp_path / f"{stem}.gz")
    rc = main(["train", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--model", "mlp", "--epochs", "1",
               "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "train-images-idx3-ubyte.gz is a FIFO, not a regular file" in err, err
    assert not (tmp_path / "run").exists()
