"""ImageFolder and Tiny ImageNet readers, the decoded-set cache, memory checks and the streaming loader."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli, one_line_error
from varprune.data import DatasetError, DeviceLoader
from varprune.data.folders import (
    FolderImageData,
    channel_stats,
    decode_image,
    estimate_bytes,
    locate_imagefolder,
    locate_tiny_imagenet,
    read_imagefolder,
    read_tiny_imagenet,
    scan_imagefolder,
    scan_tiny_imagenet,
)
from varprune.data.streaming import StreamingLoader, streaming_info
from varprune.device import available_memory, fits_on_device


def _img(path, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w) if mode == "L" else (h, w, 3)
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path)
    return a


def _folder(root, classes=("cat", "dog", "emu"), per_class=2, size=(8, 8), mode="RGB", val=True):
    arrays = {}
    seed = 0
    for split in ("train", "val") if val else ("train",):
        for c in classes:
            for i in range(per_class if split == "train" else 1):
                seed += 1
                p = root / split / c / f"{i}.png"
                arrays[p] = _img(p, size, mode, seed)
    return arrays


def test_imagefolder_exact_pixels_labels_and_classes(tmp_path):
    arrays = _folder(tmp_path / "d")
    (tmp_path / "d" / "train" / "cat" / "notes.txt").write_text("not an image")  # skipped, like torchvision
    data = read_imagefolder(tmp_path / "d", image_size=8, cache=False)
    assert isinstance(data, FolderImageData) and not data.from_cache
    assert data.classes == ["cat", "dog", "emu"] and data.info.num_classes == 3 and data.info.channels == 3
    assert data.train_x.shape == (6, 3, 8, 8) and data.train_x.dtype == torch.uint8
    assert data.train_y.tolist() == [0, 0, 1, 1, 2, 2] and data.test_y.tolist() == [0, 1, 2]
    train_paths = sorted(p for p in arrays if p.parts[-3] == "train")
    for i, p in enumerate(train_paths):
        assert np.array_equal(data.train_x[i].permute(1, 2, 0).numpy(), arrays[p])  # PNG, no resize: exact
    # mean/std against float64 numpy over the training pixels
    ref = np.stack([arrays[p] for p in train_paths]).astype(np.float64) / 255
    np.testing.assert_allclose(data.info.mean, ref.mean((0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(data.info.std, ref.std((0, 1, 2)), rtol=1e-9)


def test_resize_and_center_crop_match_torchvision(tmp_path):
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    a = _img(tmp_path / "wide.png", (48, 30), seed=3)
    out, gray = decode_image(tmp_path / "wide.png", 16)
    ref = tvf.center_crop(tvf.resize(Image.fromarray(a), 16, interpolation=InterpolationMode.BILINEAR), 16)
    assert not gray and out.shape == (16, 16, 3)
    assert np.array_equal(out, np.asarray(ref))
    b = _img(tmp_path / "tall.png", (20, 45), mode="L", seed=4)
    out, gray = decode_image(tmp_path / "tall.png", 12)
    ref = tvf.center_crop(tvf.resize(Image.fromarray(b, "L"), 12, interpolation=InterpolationMode.BILINEAR), 12)
    assert gray and np.array_equal(out, np.asarray(ref))


def test_grayscale_rule(tmp_path):
    _folder(tmp_path / "g", mode="L")
    data = read_imagefolder(tmp_path / "g", 8, cache=False)
    assert data.info.channels == 1 and data.train_x.shape[1] == 1 and len(data.info.mean) == 1
    # one colour image makes every image RGB, grey ones replicated in the three planes
    _img(tmp_path / "g" / "val" / "dog" / "colour.png", (8, 8), "RGB", 99)
    data = read_imagefolder(tmp_path / "g", 8, cache=False)
    assert data.info.channels == 3
    x = data.train_x
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_strict_errors(tmp_path):
    with pytest.raises(DatasetError, match="no train folder"):
        read_imagefolder(tmp_path, cache=False)
    _folder(tmp_path / "a", val=False)
    with pytest.raises(DatasetError, match="no val or test folder"):
        read_imagefolder(tmp_path / "a", cache=False)
    _folder(tmp_path / "b")
    (tmp_path / "b" / "train" / "dog" / "1.png").unlink()
    (tmp_path / "b" / "train" / "dog" / "0.png").unlink()
    with pytest.raises(DatasetError, match=r"class folder .*train/dog holds no images"):
        read_imagefolder(tmp_path / "b", cache=False)
    _folder(tmp_path / "c")
    _img(tmp_path / "c" / "val" / "yak" / "0.png", (8, 8))
    with pytest.raises(DatasetError, match=r"classes that train lacks \(yak\)"):
        read_imagefolder(tmp_path / "c", cache=False)
    _folder(tmp_path / "d")
    bad = tmp_path / "d" / "train" / "emu" / "broken.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[:400])
    with pytest.raises(DatasetError, match=r"cannot decode image .*broken\.jpg"):
        read_imagefolder(tmp_path / "d", 8, cache=False)
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"cannot decode image .*broken\.jpg"):
        read_imagefolder(tmp_path / "d", 8, cache=False, workers=2)


def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setenv("VARPRUNE_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "d", size=(10, 12))
    first = read_imagefolder(tmp_path / "d", 8)
    cached = sorted((tmp_path / "cache").glob("imagefolder-*.safetensors"))
    assert not first.from_cache and len(cached) == 1
    assert cached[0].read_bytes()[8:9] == b"{"  # safetensors, not a pickle
    second = read_imagefolder(tmp_path / "d", 8)
    assert second.from_cache
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert second.info == first.info and second.classes == first.classes
    # another size, or a changed file: a new key (decode again)
    assert not read_imagefolder(tmp_path / "d", 6).from_cache
    p = tmp_path / "d" / "train" / "cat" / "0.png"
    _img(p, (10, 12), seed=1234)
    os.utime(p, ns=(1, 1))
    third = read_imagefolder(tmp_path / "d", 8)
    assert not third.from_cache and not torch.equal(third.train_x[0], first.train_x[0])
    # a torn cache file is ignored and rewritten
    for f in (tmp_path / "cache").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    assert not read_imagefolder(tmp_path / "d", 8).from_cache
    assert read_imagefolder(tmp_path / "d", 8).from_cache


def _tiny(root, wnids=("n01", "n02", "n03")):
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n00\tentity\nn01\tgoldfish, Carassius auratus\nn02\ttabby\n")
    seed = 0
    for w in wnids:
        for i in range(2):
            seed += 1
            _img(root / "train" / w / "images" / f"{w}_{i}.JPEG", (64, 64), seed=seed)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for i, w in enumerate(["n03", "n01", "n02", "n03"]):
        _img(root / "val" / "images" / f"val_{i}.JPEG", (64, 64), mode="L" if i == 0 else "RGB", seed=100 + i)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_layout(tmp_path):
    _tiny(tmp_path / "tiny-imagenet-200")
    data = read_tiny_imagenet(tmp_path, cache=False)  # the parent folder works too
    assert data.classes == ["n01", "n02", "n03"] and data.class_names == ["goldfish", "tabby", "n03"]
    assert data.info.num_classes == 3 and data.info.size == 64 and data.info.channels == 3
    assert data.train_x.shape == (6, 3, 64, 64) and data.train_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.test_y.tolist() == [2, 0, 1, 2]
    g = data.test_x[0]  # the greyscale val image, replicated
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    loc = locate_tiny_imagenet(tmp_path)
    assert loc.complete and loc.num_classes == 3 and loc.num_images == 10


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DatasetError, match="no wnids.txt"):
        read_tiny_imagenet(tmp_path, cache=False)
    _tiny(tmp_path / "t")
    ann = tmp_path / "t" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text().replace("n02", "n99"))
    with pytest.raises(DatasetError, match="names class 'n99', which wnids.txt lacks"):
        read_tiny_imagenet(tmp_path / "t", cache=False)
    ann.write_text("\n".join(ann.read_text().replace("n99", "n02").splitlines()[1:]))
    with pytest.raises(DatasetError, match=r"val_0\.JPEG has no line in"):
        read_tiny_imagenet(tmp_path / "t", cache=False)
    assert not locate_tiny_imagenet(tmp_path / "t").complete
    assert "val_0.JPEG" in locate_tiny_imagenet(tmp_path / "t").not_found_message()


def test_locate_imagefolder(tmp_path):
    _folder(tmp_path / "d")
    loc = locate_imagefolder(tmp_path / "d")
    assert loc.complete and loc.num_classes == 3 and loc.num_images == 9
    loc = locate_imagefolder(tmp_path / "nowhere")
    assert not loc.complete and "no train folder" in loc.not_found_message()


def test_memory_estimate():
    assert estimate_bytes(100_000, 3, 64) == 100_000 * (3 * 64 * 64 + 8)
    free = available_memory("cpu")
    assert free > 0
    assert fits_on_device(1, "cpu") and not fits_on_device(2 * free + 1, "cpu")
    if torch.cuda.is_available():
        assert available_memory("cuda") > 0


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_equals_device_loader_on_eval(tmp_path, workers):
    _folder(tmp_path / "d", size=(10, 9))
    _img(tmp_path / "d" / "train" / "dog" / "grey.png", (9, 9), "L", 77)
    data = read_imagefolder(tmp_path / "d", 8, cache=False)
    listing = scan_imagefolder(tmp_path / "d")
    info = streaming_info(listing, 8)
    assert info.channels == data.info.channels == 3
    stream = StreamingLoader(listing.train_files, listing.train_labels, data.info, 3, train=False, num_workers=workers)
    ref = DeviceLoader(data.train_x, data.train_y, data.info, 3, train=False)
    assert len(stream) == len(ref) == 3 and stream.num_examples == 7
    for (xs, ys), (xr, yr) in zip(stream, ref):
        assert xs.dtype == torch.float32
        torch.testing.assert_close(xs, xr)
        assert torch.equal(ys, yr)


def test_streaming_take_equals_the_device_loaders(tmp_path):
    """take(): the raw examples BN re-tuning, calibration and the analysis draw, decoded from the files in the
    order asked; normalize() makes the same inputs as the device loader's."""
    _folder(tmp_path / "d", size=(10, 9), per_class=3)
    data = read_imagefolder(tmp_path / "d", 8, cache=False)
    listing = scan_imagefolder(tmp_path / "d")
    stream = StreamingLoader(listing.train_files, listing.train_labels, data.info, 4, train=True, num_workers=1)
    ref = DeviceLoader(data.train_x, data.train_y, data.info, 4, train=True)
    pick = torch.tensor([5, 0, 3, 3])
    (xs, ys), (xr, yr) = stream.take(pick), ref.take(pick)
    assert xs.dtype == xr.dtype == torch.uint8 and torch.equal(xs, xr) and torch.equal(ys, yr)
    torch.testing.assert_close(stream.normalize(xs), ref.normalize(xr))


@pytest.mark.slow
def test_a_streamed_run_is_pruned_retuned_calibrated_and_analysed_as_a_held_one(tmp_path, monkeypatch):
    """A run of a folder too large for the device streams its files; prune (BN re-tuning), Wanda and SparseGPT and
    analyze used to fail on it ('StreamingLoader' has no attribute 'images'). Pruned streamed and held, the same
    run gives the same numbers."""
    import json

    import varprune.engine.runs as runs
    from varprune.cli import main

    _folder(tmp_path / "d", per_class=12, size=(12, 12))
    run = tmp_path / "run"
    common = ["--bnt-batches", "2", "--bnt-batch-size", "8"]
    train = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "d"), "--model", "mlp", "--image-size", "8"]
    assert main(["train", *train, "--epochs", "1", "--batch-size", "8", "--out", str(run), "--quiet"]) == 0
    sweep = ["prune", str(run), "--sparsities", "0.5,0.9", "--pruners", "magnitude,wanda,sparsegpt", "--force"]
    export = ["export", str(run), "--sparsity", "0.5", "--pruner", "sparsegpt", "--calib-samples", "16", *common]
    assert main([*sweep, "--calib-samples", "16", *common]) == 0
    assert main([*export, "--out", str(tmp_path / "held.safetensors")]) == 0

    def untimed():  # each row's prune_s is a measured time: the rest must agree
        return [
            {k: v for k, v in r.items() if k != "prune_s"}
            for r in json.loads((run / "prune.json").read_text())["results"]
        ]

    held = untimed()
    monkeypatch.setattr(runs, "fits_on_device", lambda *a, **k: False)  # the set no longer fits: streamed
    assert main([*sweep, "--calib-samples", "16", *common]) == 0
    assert main([*export, "--out", str(tmp_path / "streamed.safetensors")]) == 0
    assert untimed() == held
    # SparseGPT's updated weights and the re-tuned BatchNorm statistics depend on every input drawn
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "held.safetensors").read_bytes()
    assert main(["analyze", str(run), "--out", str(tmp_path / "an"), *common]) == 0


def test_streaming_train_epoch_augmented_and_reproducible(tmp_path):
    _folder(tmp_path / "d", per_class=3)
    listing = scan_imagefolder(tmp_path / "d")
    info = streaming_info(listing, 8)
    from varprune.tasks import task_for

    augment = task_for(info).augment
    a = StreamingLoader(
        listing.train_files, listing.train_labels, info, 4, train=True, seed=5, num_workers=0, augment=augment
    )
    b = StreamingLoader(
        listing.train_files, listing.train_labels, info, 4, train=True, seed=5, num_workers=1, augment=augment
    )
    plain = StreamingLoader(listing.train_files, listing.train_labels, info, 100, train=True, seed=1, num_workers=0)
    ((x_plain, _),) = list(plain)
    ba, bb = list(a), list(b)
    assert [len(y) for _, y in ba] == [4, 4, 1]
    assert sorted(torch.cat([y for _, y in ba]).tolist()) == sorted(listing.train_labels)
    for (xa, ya), (xb, yb) in zip(ba, bb):  # batches do not depend on the worker count
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.cat([y for _, y in ba]).tolist() != listing.train_labels  # shuffled (seed 5)
    assert info.crop_pad == 1 and info.flip
    aug = StreamingLoader(
        listing.train_files, listing.train_labels, info, 100, train=True, seed=1, augment=augment, num_workers=0
    )
    ((x_aug, _),) = list(aug)
    assert x_aug.shape == x_plain.shape and not torch.equal(x_aug, x_plain)  # crops/flips on the host


def test_channel_stats_constant_channel():
    x = torch.full((2, 1, 3, 3), 7, dtype=torch.uint8)
    mean, std = channel_stats(x)
    assert mean[0] == pytest.approx(7 / 255) and std[0] > 0


def test_fewer_than_two_classes_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    """One class trains to 100% and says nothing: refused by the listing (imagefolder and Tiny ImageNet), and by
    train as one line, exit 2, before its run folder exists."""
    _folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(DatasetError, match=r"only one class folder \(cat\): a classifier needs at least two"):
        scan_imagefolder(tmp_path / "one")
    _tiny(tmp_path / "t", wnids=("n01",))
    (tmp_path / "t" / "val" / "val_annotations.txt").write_text("")
    with pytest.raises(DatasetError, match=r"wnids.txt has only one class \(n01\)"):
        scan_tiny_imagenet(tmp_path / "t")
    out = tmp_path / "run"
    args = ["--dataset", "imagefolder", "--data-dir", tmp_path / "one", "--model", "mlp", "--epochs", "1"]
    rc, _, err = cli(capsys, "train", *args, "--device", "cpu", "--out", out)
    assert "at least two classes" in one_line_error(rc, err) and not out.exists()
