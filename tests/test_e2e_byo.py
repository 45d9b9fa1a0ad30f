"""Bring your own data and models end to end (issue 12), through ``varprune.cli.main``.

Image folders and a Tiny-ImageNet layout are written by the tests; timm models,
Wide ResNets, ``--init`` and AdamW run on a Fashion-MNIST subset.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

Image = pytest.importorskip("PIL.Image")

from helpers import cli, one_line_error  # noqa: E402
from varprune.cli import main  # noqa: E402

QUICK = ["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet"]
FM = ["--limit-train", "128", "--limit-test", "64"]
PRUNE = ["--sparsities", "0.5,0.9", "--device", "cpu", "--bnt-batches", "1", "--bnt-batch-size", "32"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VARPRUNE_CACHE", str(tmp_path / "cache"))  # the folder readers' cache stays here


def check_accuracy_sweep(run: Path):
    doc = json.loads((run / "prune.json").read_text())
    assert "metric" not in doc and 0 <= doc["dense_accuracy"] <= 1
    assert [r["sparsity"] for r in doc["results"]] == [0.5, 0.9]
    for r in doc["results"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["accuracy_bnt"] <= 1
        assert abs(r["realised_sparsity"] - r["sparsity"]) < 0.01
    return doc


def resolved(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class=8, val=3, size=(20, 18), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val)):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0]) + (() if mode == "L" else (3,))
                px = np.clip(rng.normal(60 + 120 * ci, 30, shape), 0, 255).astype(np.uint8)  # learnable
                Image.fromarray(px, mode).save(root / split / c / f"{i}.png")
    return root


def write_tiny_imagenet(root: Path, wnids=("n01443537", "n01629819"), per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text(f"{wnids[0]}\tgoldfish, Carassius auratus\n{wnids[1]}\teuropean fire salamander\n")
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                root / "train" / w / "images" / f"{w}_{i}.JPEG", quality=90
            )
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            root / "val" / "images" / f"val_{i}.JPEG", quality=90
        )
        lines.append(f"val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t7\t7")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------ data


def test_imagefolder_trains_prunes_and_records_classes(tmp_path, capsys):
    data = write_imagefolder(tmp_path / "folder")
    run = tmp_path / "run"
    rc, _, err = cli(
        capsys,
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        data,
        "--image-size",
        "16",
        "--model",
        "mlp",
        *QUICK,
        "--batch-size",
        "8",
        "--out",
        run,
    )
    assert rc == 0, err
    r = resolved(run)["resolved"]
    assert r["class_names"] == ["cat", "dog"] and r["num_classes"] == 2 and r["input_shape"] == [3, 16, 16]
    assert r["train_examples"] == 16 and r["test_examples"] == 6
    rc, _, err = cli(capsys, "prune", run, *PRUNE, "--bnt-batch-size", "8")
    assert rc == 0, err
    check_accuracy_sweep(run)


def test_tiny_imagenet_layout_trains_and_prunes(tmp_path, capsys):
    data = write_tiny_imagenet(tmp_path / "tiny")
    run = tmp_path / "run"
    rc, _, err = cli(
        capsys,
        "train",
        "--dataset",
        "tiny-imagenet",
        "--data-dir",
        data,
        "--model",
        "resnet20",
        *QUICK,
        "--batch-size",
        "4",
        "--out",
        run,
    )
    assert rc == 0, err
    r = resolved(run)["resolved"]
    assert r["class_names"] == ["goldfish", "european fire salamander"] and r["input_shape"] == [3, 64, 64]
    assert r["train_examples"] == 8 and r["test_examples"] == 4
    rc, _, err = cli(capsys, "prune", run, *PRUNE, "--bnt-batch-size", "4")
    assert rc == 0, err
    check_accuracy_sweep(run)
    small = tmp_path / "run32"  # --image-size reaches this reader too
    rc, _, err = cli(
        capsys,
        "train",
        "--dataset",
        "tiny-imagenet",
        "--data-dir",
        data,
        "--model",
        "resnet20",
        *QUICK,
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--out",
        small,
    )
    assert rc == 0, err
    assert resolved(small)["resolved"]["input_shape"] == [3, 32, 32]


def test_image_size_resizes_fashion_mnist_for_the_model_and_the_sweep(tmp_path, capsys, fmnist_dir):
    # it used to be ignored for the torchvision sets: the run trained at 28 px and config.json said 16
    run = tmp_path / "mlp16"
    rc, _, err = cli(
        capsys, "train", "--data-dir", fmnist_dir, "--model", "mlp", *QUICK, *FM, "--image-size", "16", "--out", run
    )
    assert rc == 0, err
    assert resolved(run)["resolved"]["input_shape"] == [1, 16, 16]
    assert load_file(run / "model.safetensors")["1.weight"].shape == (1024, 16 * 16)
    native = tmp_path / "mlp28"
    rc, _, err = cli(capsys, "train", "--data-dir", fmnist_dir, "--model", "mlp", *QUICK, *FM, "--out", native)
    assert rc == 0, err
    rc, _, err = cli(capsys, "prune", native, run, *PRUNE)  # one command, two image sizes: data not shared
    assert rc == 0, err
    check_accuracy_sweep(run)
    check_accuracy_sweep(native)


# ------------------------------------------------------------ models


def test_timm_resnet18_trains_and_prunes(tmp_path, capsys, fmnist_dir):
    pytest.importorskip("timm", reason="timm not installed: pip install timm")
    run = tmp_path / "run"
    rc, _, err = cli(
        capsys, "train", "--model", "timm:resnet18", "--limit-train", "64", "--limit-test", "64", *QUICK, "--out", run
    )
    assert rc == 0, err
    assert resolved(run)["train"]["model"] == "timm:resnet18"
    rc, _, err = cli(capsys, "prune", run, *PRUNE)
    assert rc == 0, err
    check_accuracy_sweep(run)


def _wrn_weights(depth, k, cin, classes):
    """Prunable weights of a pre-activation WRN-depth-k, counted from the paper's architecture."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 3 * cin * 16
    for g in range(3):
        a, b = widths[g], widths[g + 1]
        for i in range(n):
            cin_i = a if i == 0 else b
            total += 9 * cin_i * b + 9 * b * b + (cin_i * b if cin_i != b else 0)
    return total + widths[3] * classes


def test_wrn16_8_trains_one_step_and_prunes(tmp_path, capsys, fmnist_dir):
    run = tmp_path / "run"
    rc, _, err = cli(
        capsys,
        "train",
        "--model",
        "wrn16_8",
        "--limit-train",
        "4",
        "--limit-test",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        run,
    )
    assert rc == 0, err
    weights = load_file(str(run / "model.safetensors"))
    prunable = sum(v.numel() for k, v in weights.items() if k.endswith("weight") and v.dim() > 1)
    assert prunable == _wrn_weights(16, 8, 1, 10)
    assert 10.9e6 < prunable < 11.1e6  # the registry's description: 11.0M weights
    rc, _, err = cli(capsys, "prune", run, *PRUNE, "--bnt-batch-size", "4")
    assert rc == 0, err
    check_accuracy_sweep(run)


# ------------------------------------------------------------ --init


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, fmnist_dir):
    run = tmp_path_factory.mktemp("init") / "a"
    assert main(["train", "--model", "mlp", *QUICK, *FM, "--out", str(run)]) == 0
    return run


def _linear_weights(path):
    w = load_file(str(path))
    return {k: v for k, v in w.items() if k.endswith("weight") and v.dim() == 2}


def test_init_starts_from_the_files_weights(tmp_path, capsys, run_a):
    a = _linear_weights(run_a / "model.safetensors")
    init = tmp_path / "a.safetensors"
    shutil.copy(run_a / "model.safetensors", init)
    b, c = tmp_path / "b", tmp_path / "c"
    tiny = ["--model", "mlp", *QUICK, *FM, "--lr", "1e-9", "--seed", "1"]
    assert cli(capsys, "train", *tiny, "--init", init, "--out", b)[0] == 0
    assert cli(capsys, "train", *tiny, "--out", c)[0] == 0
    assert resolved(b)["train"]["init"] == str(init) and resolved(c)["train"]["init"] is None
    wb, wc = _linear_weights(b / "model.safetensors"), _linear_weights(c / "model.safetensors")
    for k in a:
        assert (wb[k] - a[k]).abs().max() < 1e-6, k  # one epoch at lr 1e-9 from A's weights
        assert (wc[k] - a[k]).abs().max() > 1e-2, k  # without --init: its own initialisation
    # B's weights are its own: pruning B does not need A's file any more
    init.unlink()
    rc, _, err = cli(capsys, "prune", b, *PRUNE)
    assert rc == 0, err
    check_accuracy_sweep(b)


def test_init_of_another_head_needs_exclude(tmp_path, capsys, run_a):
    data = write_imagefolder(tmp_path / "gray", mode="L", size=(28, 28))  # 1x28x28 like Fashion-MNIST, 2 classes
    run = tmp_path / "b"
    args = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        data,
        "--image-size",
        "28",
        "--model",
        "mlp",
        *QUICK,
        "--batch-size",
        "8",
        "--init",
        run_a / "model.safetensors",
        "--out",
        run,
    ]
    rc, _, err = cli(capsys, *args)
    line = one_line_error(rc, err)
    assert "7.weight" in line and "--init-exclude '7.*'" in line and "--init-exclude" in line, line
    assert not run.exists()
    rc, _, err = cli(capsys, *args, "--init-exclude", "7.*")
    assert rc == 0, err
    a, b = load_file(str(run_a / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert b["7.weight"].shape == (2, 1024) and a["7.weight"].shape == (10, 1024)
    assert resolved(run)["train"]["init_exclude"] == ["7.*"]


def test_adamw_defaults_written_and_used(tmp_path, capsys, fmnist_dir):
    from varprune.storage.checkpoint import load_checkpoint

    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--model", "mlp", "--optimizer", "adamw", *QUICK, *FM, "--out", run)
    assert rc == 0, err
    train = resolved(run)["train"]
    assert train["optimizer"] == "adamw" and train["lr"] == 0.001 and train["weight_decay"] == 0.05
    state = load_checkpoint(run / "checkpoint.safetensors")["optimizer"]
    group = state["param_groups"][0]
    assert group["weight_decay"] == 0.05 and "betas" in group
    assert all("exp_avg_sq" in s for s in state["state"].values())  # Adam's second moments, not momentum
    # an explicit value wins over the optimizer's default
    run2 = tmp_path / "run2"
    assert (
        cli(capsys, "train", "--model", "mlp", "--optimizer", "adamw", "--lr", "0.003", *QUICK, *FM, "--out", run2)[0]
        == 0
    )
    assert resolved(run2)["train"]["lr"] == 0.003 and resolved(run2)["train"]["weight_decay"] == 0.05
