"""Segmentation end to end (issue 9): the CLI on every reader, joint augmentation, the loss, bad input.

Commands run in-process through ``varprune.cli.main`` (the same code path as
the ``varprune`` script, without paying torch's import per command). Data
folders are written by the tests; Colin27 comes from Debian's mricron-data.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import cli, one_line_error
from varprune.data.segmentation import DEBIAN_MRICRON
from varprune.tasks import Segmentation, crop_flip

MRICRON = Path(DEBIAN_MRICRON)
needs_colin = pytest.mark.skipif(
    not (MRICRON / "aal.nii.gz").is_file(), reason="Debian mricron-data not installed (apt-get install mricron-data)"
)
THRESH = 128


# ------------------------------------------------------------ tiny data folders


def _pixels(rng, shape):
    """uint8 pixels that avoid the threshold's neighbourhood (so mask = image > THRESH survives rounding)."""
    v = rng.integers(0, 256 - 32, shape)
    return np.where(v >= THRESH - 16, v + 32, v).astype(np.uint8)


def write_seg_folder(root: Path, n=6, hw=(16, 16), seed=0):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for k in range(n):
        px = _pixels(rng, hw)
        Image.fromarray(px, "L").save(root / "images" / f"i{k:02d}.png")
        Image.fromarray(((px > THRESH) * 255).astype(np.uint8), "L").save(root / "masks" / f"i{k:02d}.png")
    return root


def save_nifti(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def write_msd(root: Path, n=4, shape=(16, 16, 4), seed=0):
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for k in range(n):
        img = rng.normal(100, 20, shape).astype(np.float32)
        save_nifti(root / "imagesTr" / f"c{k}.nii.gz", img)
        save_nifti(root / "labelsTr" / f"c{k}.nii.gz", (img > 110).astype(np.uint8))
        training.append({"image": f"./imagesTr/c{k}.nii.gz", "label": f"./labelsTr/c{k}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "fg"}, "modality": {"0": "MR"}, "training": training})
    )
    return root


SMALL = ["--image-size", "16"]
TRAIN = [
    "--model",
    "unet",
    "--model-arg",
    "width=4",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "--quiet",
]
PRUNE = ["--sparsities", "0.5,0.9", "--device", "cpu", "--bnt-batches", "1", "--bnt-batch-size", "8"]


def check_dice_sweep(run: Path):
    doc = json.loads((run / "prune.json").read_text())
    assert doc["metric"] == "dice"
    assert 0 <= doc["dense_dice"] <= 1
    assert [r["sparsity"] for r in doc["results"]] == [0.5, 0.9]
    for r in doc["results"]:
        assert 0 <= r["dice"] <= 1 and 0 <= r["dice_bnt"] <= 1
        assert abs(r["realised_sparsity"] - r["sparsity"]) < 0.01
        assert "accuracy" not in r and "accuracy_bnt" not in r
    assert "dense_accuracy" not in doc
    return doc


# ------------------------------------------------------------ joint augmentation


def test_mask_and_image_receive_the_same_crop_and_flip():
    """mask = image > t before augmentation must still hold after it, for many random draws
    (zero padding is below t and background alike), and the draws must actually move pixels."""
    task = Segmentation(2, crop_pad=4, flip=True)
    rng = np.random.default_rng(0)
    moved = flipped = 0
    for seed in range(40):
        x = torch.from_numpy(_pixels(rng, (8, 3, 12, 14)))
        y = (x[:, 0] > THRESH).long()
        g = torch.Generator().manual_seed(seed)
        xa, ya = task.augment(x, y, g)
        assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == torch.long
        assert torch.equal(ya, (xa[:, 0] > THRESH).long()), f"draw {seed}: mask no longer follows the image"
        moved += int((xa != x).flatten(1).any(1).sum())
        flipped += int(sum(torch.equal(xa[i], x[i].flip(-1)) for i in range(len(x))))
    assert moved > 300 and flipped > 0  # the augmentation did something, and flips alone happen too


def test_crop_flip_same_stream_with_or_without_mask():
    x = torch.from_numpy(_pixels(np.random.default_rng(1), (16, 1, 10, 10)))
    a, _ = crop_flip(x, None, 3, True, torch.Generator().manual_seed(5))
    b, _ = crop_flip(x, (x[:, 0] > THRESH).long(), 3, True, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_training_loader_keeps_mask_with_image(tmp_path):
    """The loader `train` uses (seg-folder read from PNGs, augmented, normalised) keeps mask = f(image)."""
    from varprune.engine.config import TrainConfig
    from varprune.engine.loop import load_data

    root = write_seg_folder(tmp_path / "sf", n=8)
    cfg = TrainConfig(
        dataset="seg-folder", data_dir=str(root), model="unet", batch_size=4, device="cpu", image_size=16
    )  # the files' own size: no resampling between image and mask
    run = load_data(cfg, torch.device("cpu"))
    loader = run.train_loader
    std, mean = torch.tensor(run.data.info.std).view(1, -1, 1, 1), torch.tensor(run.data.info.mean).view(1, -1, 1, 1)
    seen = 0
    for _ in range(10):
        for x, y in loader:
            raw = torch.round((x * std + mean) * 255)
            assert torch.equal(y, (raw[:, 0] > THRESH).long())
            seen += len(y)
    assert seen >= 60


# ------------------------------------------------------------ the loss


def test_segmentation_loss_is_ce_plus_soft_dice_float64():
    torch.manual_seed(0)
    c = 4
    logits = torch.randn(3, c, 7, 9) * 3
    target = torch.randint(0, c, (3, 7, 9))
    target[0, 0, 0] = 0
    got = Segmentation(c).loss(logits, target)
    # independent float64 reference: explicit log-softmax, explicit one-hot by comparison
    z = logits.double().numpy()
    t = target.numpy()
    zmax = z.max(1, keepdims=True)
    logp = z - zmax - np.log(np.exp(z - zmax).sum(1, keepdims=True))
    p = np.exp(logp)
    onehot = np.stack([(t == k) for k in range(c)], 1).astype(np.float64)
    ce = -(logp * onehot).sum(1).mean()
    dices = [
        (2 * (p[:, k] * onehot[:, k]).sum() + 1e-5) / (p[:, k].sum() + onehot[:, k].sum() + 1e-5) for k in range(1, c)
    ]
    expect = ce + 1 - np.mean(dices)
    assert got.dtype == torch.float32
    assert abs(float(got) - expect) < 1e-5 * max(1, abs(expect))
    # and its gradient is finite and non-zero
    lg = logits.clone().requires_grad_()
    Segmentation(c).loss(lg, target).backward()
    assert torch.isfinite(lg.grad).all() and lg.grad.abs().sum() > 0


# ------------------------------------------------------------ the CLI on each reader


def test_msd_train_and_prune(tmp_path, capsys):
    root = write_msd(tmp_path / "msd")
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--dataset", "msd", "--data-dir", root, *SMALL, *TRAIN, "--out", run)
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["task"] == "segmentation" and cfg["resolved"]["class_names"] == ["background", "fg"]
    rc, out, err = cli(capsys, "prune", run, *PRUNE)
    assert rc == 0, err
    check_dice_sweep(run)
    assert "Dice" in out


def test_seg_folder_train_and_prune(tmp_path, capsys):
    root = write_seg_folder(tmp_path / "sf")
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--dataset", "seg-folder", "--data-dir", root, *SMALL, *TRAIN, "--out", run)
    assert rc == 0, err
    rc, _, err = cli(capsys, "prune", run, *PRUNE)
    assert rc == 0, err
    check_dice_sweep(run)
    assert (run / "prune.png").is_file() and (run / "prune.csv").is_file()


@needs_colin
def test_colin27_train_and_prune(tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = cli(
        capsys, "train", "--dataset", "colin27", *TRAIN, "--limit-train", "8", "--limit-test", "4", "--out", run
    )
    assert rc == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["num_classes"] == 8 and cfg["resolved"]["train_examples"] == 8
    rc, _, err = cli(capsys, "prune", run, *PRUNE)
    assert rc == 0, err
    doc = check_dice_sweep(run)
    assert len(doc["dense_metrics"]["dice_per_class"]) == 8


# ------------------------------------------------------------ bad input


def _bad_msd(tmp_path, kind):
    root = write_msd(tmp_path / kind, n=3)
    if kind == "shape":
        save_nifti(root / "labelsTr" / "c1.nii.gz", np.zeros((16, 15, 4), np.uint8))
        return root, "c1.nii.gz"
    if kind == "values":
        lab = np.zeros((16, 16, 4), np.uint8)
        lab[3, 3, 1] = 5
        save_nifti(root / "labelsTr" / "c2.nii.gz", lab)
        return root, "c2.nii.gz"
    if kind == "garbage":
        (root / "imagesTr" / "c0.nii.gz").write_bytes(b"not a nifti file")
        return root, "c0.nii.gz"
    if kind == "truncated":
        p = root / "labelsTr" / "c2.nii.gz"
        p.write_bytes(p.read_bytes()[:60])
        return root, "c2.nii.gz"
    raise AssertionError(kind)


def _bad_folder(tmp_path, kind):
    root = write_seg_folder(tmp_path / kind, n=4)
    if kind == "nomask":
        (root / "masks" / "i01.png").unlink()
        return root, "i01.png"
    if kind == "badpng":
        (root / "images" / "i02.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        return root, "i02.png"
    if kind == "maskvalues":
        Image.fromarray(np.full((16, 16), 77, np.uint8), "L").save(root / "masks" / "i03.png")
        return root, "i03.png"
    if kind == "empty":
        for p in list((root / "images").iterdir()) + list((root / "masks").iterdir()):
            p.unlink()
        return root, "images"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "dataset,kind",
    [
        ("msd", "shape"),
        ("msd", "values"),
        ("msd", "garbage"),
        ("msd", "truncated"),
        ("seg-folder", "nomask"),
        ("seg-folder", "badpng"),
        ("seg-folder", "maskvalues"),
        ("seg-folder", "empty"),
    ],
)
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, dataset, kind):
    root, name = (_bad_msd if dataset == "msd" else _bad_folder)(tmp_path, kind)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--dataset", dataset, "--data-dir", root, *SMALL, *TRAIN, "--out", run)
    line = one_line_error(rc, err)
    assert name in line, line
    assert not run.exists(), f"{run} left behind: {list(run.iterdir())}"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_bad_data_on_overwrite_keeps_the_old_run(tmp_path, capsys):
    good = write_seg_folder(tmp_path / "good")
    run = tmp_path / "run"
    assert cli(capsys, "train", "--dataset", "seg-folder", "--data-dir", good, *SMALL, *TRAIN, "--out", run)[0] == 0
    weights = (run / "model.safetensors").read_bytes()
    bad, name = _bad_folder(tmp_path, "nomask")
    rc, _, err = cli(
        capsys, "train", "--dataset", "seg-folder", "--data-dir", bad, *SMALL, *TRAIN, "--out", run, "--overwrite"
    )
    assert name in one_line_error(rc, err)
    assert (run / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    "dataset,model,word", [("fashion-mnist", "unet", "segmentation model"), ("colin27", "mlp", "classification model")]
)
def test_model_of_the_wrong_task_is_refused(tmp_path, capsys, dataset, model, word):
    run = tmp_path / "run"
    rc, _, err = cli(
        capsys, "train", "--dataset", dataset, "--model", model, "--epochs", "1", "--device", "cpu", "--out", run
    )
    line = one_line_error(rc, err)
    assert word in line and f"--model {model}" in line
    assert not run.exists()


def test_classification_prune_json_keys_unchanged(tmp_path, capsys, fmnist_dir):
    run = tmp_path / "run"
    rc, _, err = cli(
        capsys,
        "train",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--limit-train",
        "256",
        "--limit-test",
        "128",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        run,
    )
    assert rc == 0, err
    rc, _, err = cli(
        capsys,
        "prune",
        run,
        "--sparsities",
        "0.5,0.9",
        "--device",
        "cpu",
        "--bnt-batches",
        "1",
        "--bnt-batch-size",
        "64",
    )
    assert rc == 0, err
    doc = json.loads((run / "prune.json").read_text())
    assert "metric" not in doc and "dense_metrics" not in doc and 0 <= doc["dense_accuracy"] <= 1
    for r in doc["results"]:
        # the keys of 0.2, the pruner of each result (0.3: several pruners side by side), magnitude's scope and the
        # time the pruning took (0.4)
        assert set(r) == {"pruner", "scope", "sparsity", "realised_sparsity", "accuracy", "accuracy_bnt", "prune_s"}
        assert r["pruner"] == "magnitude"


# ------------------------------------------------------------ the demo


@needs_colin
def test_segmentation_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, _, err = cli(capsys, "demo", "--task", "segmentation", "--size", "tiny", "--out", out, "--quiet")
    assert rc == 0, err
    with Image.open(out / "examples.png") as im:
        im.load()
        assert im.size[0] > 100 and im.size[1] > 100
    for name in ("sgd", "var"):
        check_dice_sweep(out / name)
    assert (out / "demo.png").is_file() and "Dice" in (out / "results.md").read_text()
