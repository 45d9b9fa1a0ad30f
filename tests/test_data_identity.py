"""Issue 19, section 3: every command that evaluates or continues a run checks that the data it is given is the
run's (task, number and names of classes, channels, image size) and blames the data, naming both."""

import numpy as np
import pytest
from PIL import Image

from helpers import cli, one_line_error

FOLDER = [
    "--dataset",
    "imagefolder",
    "--image-size",
    "8",
    "--model",
    "mlp",
    "--model-arg",
    "width=16",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--device",
    "cpu",
    "--quiet",
]
BNT = ["--bnt-batches", "1", "--bnt-batch-size", "4"]


def image_folder(root, classes=("cat", "dog"), mode="L", per_class=4, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (8, 8, 3) if mode == "RGB" else (8, 8)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    data = image_folder(root / "data")
    run = root / "run"
    assert cli_main("train", *FOLDER, "--data-dir", data, "--out", run) == 0
    assert cli_main("export", run, "--sparsity", "0.5", *BNT, "--out", root / "pruned.safetensors") == 0
    return data, run, root / "pruned.safetensors"


def cli_main(*args):
    from varprune.cli import main

    return main([str(a) for a in args])


@pytest.mark.parametrize(
    ("classes", "mode", "what"),
    [
        (("cat", "dog", "emu"), "L", "3 classes"),  # one class: refused by the listing itself (test_folderdata)
        (("ant", "bee"), "L", "ant, bee"),
        (("cat", "dog"), "RGB", "3 channel"),
    ],
)
def test_evaluate_prune_and_resume_refuse_other_data(capsys, trained, tmp_path, classes, mode, what):
    _data, run, pruned = trained
    other = image_folder(tmp_path / "other", classes, mode, seed=1)
    for args in (
        ("evaluate", pruned, "--data-dir", other),
        ("prune", run, "--force", "--data-dir", other, *BNT, "--sparsities", "0.5"),
    ):
        line = one_line_error(*cli(capsys, *args)[::2])
        assert f"--data-dir {other} holds" in line and what in line and "cat, dog" in line, line
    line = one_line_error(*cli(capsys, "train", "--resume", run, "--data-dir", other)[::2])
    assert f"--data-dir {other} holds" in line and what in line


def test_the_runs_own_data_still_works(capsys, trained, tmp_path):
    _data, _run, pruned = trained
    copy = image_folder(tmp_path / "copy", seed=0)  # the same classes, shape and pixels elsewhere
    rc, out, err = cli(capsys, "evaluate", pruned, "--data-dir", copy)
    assert rc == 0 and "accuracy" in out, err
