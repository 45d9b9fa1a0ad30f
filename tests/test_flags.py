"""Issue 19, section 2: a flag the chosen method or optimizer does not read is refused, never written into
config.json as if it had done something (train, study, tune, finetune; --resume takes no training flags)."""

import shutil

import pytest

from helpers import SWEEP, TINY, cli, one_line_error, train_tiny

IGNORED = [
    (["--method", "sgd", "--rho", "0.1"], "--rho"),
    (["--method", "var", "--l1-alpha", "0.01"], "--l1-alpha"),
    (["--method", "sgd", "--hoyer-alpha", "0.01"], "--hoyer-alpha"),
    (["--method", "sgd", "--cram-sparsities", "0.5"], "--cram-sparsities"),
    (["--method", "sgd", "--var-strength", "3"], "--var-strength"),
    (["--method", "sgd", "--var-lambda", "1e-3"], "--var-lambda"),
    (["--method", "var", "--reg-in-every-pass"], "--reg-in-every-pass"),
    (["--method", "sam", "--cram-sparsities", "0.5"], "--cram-sparsities"),
    (["--optimizer", "adamw", "--momentum", "0.5"], "--momentum"),
]


@pytest.mark.parametrize(("flags", "name"), IGNORED)
def test_train_refuses_a_flag_its_method_does_not_read(capsys, tmp_path, fmnist_dir, flags, name):
    out = tmp_path / "run"
    line = one_line_error(*cli(capsys, "train", *TINY, "--data-dir", fmnist_dir, *flags, "--out", out)[::2])
    assert name in line and "applies to" in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "cram+", "--rho", "0.1", "--cram-sparsities", "0.5"],
        ["--method", "var+sam", "--reg-in-every-pass"],
        ["--method", "var", "--var-strength", "3"],
        ["--optimizer", "sgd", "--momentum", "0.5"],
    ],
)
def test_flags_a_method_reads_are_accepted(capsys, tmp_path, fmnist_dir, flags):
    rc, _, err = cli(
        capsys, "train", *TINY, "--data-dir", fmnist_dir, *flags, "--limit-train", "64", "--out", tmp_path / "run"
    )
    assert rc == 0, err


def test_study_tune_and_finetune_refuse_them_too(capsys, tmp_path, fmnist_dir):
    line = one_line_error(
        *cli(
            capsys,
            "study",
            "--out",
            tmp_path / "s",
            *TINY,
            "--data-dir",
            fmnist_dir,
            "--methods",
            "sgd,sam",
            "--l1-alpha",
            "0.1",
            *SWEEP,
        )[::2]
    )
    assert "--l1-alpha" in line and "--methods sgd,sam" in line
    assert not (tmp_path / "s").exists()
    rc, _, err = cli(
        capsys,
        "study",
        "--out",
        tmp_path / "s2",
        *TINY,
        "--data-dir",
        fmnist_dir,
        "--methods",
        "sgd,var",
        "--var-strength",
        "3",
        "--no-analysis",
        "--seeds",
        "0",
        *SWEEP,
    )
    assert rc == 0, err  # var reads it: the study takes it
    line = one_line_error(
        *cli(
            capsys,
            "tune",
            "--out",
            tmp_path / "t",
            *TINY,
            "--data-dir",
            fmnist_dir,
            "--sparsity",
            "0.5",
            "--rho",
            "0.1",
        )[::2]
    )
    assert "--rho" in line
    run = train_tiny(tmp_path / "r", fmnist_dir)
    line = one_line_error(
        *cli(capsys, "finetune", run, "--sparsity", "0.5", "--out", tmp_path / "ft", "--rho", "0.2", "--quiet")[::2]
    )
    assert "--rho" in line and not (tmp_path / "ft").exists()
    line = one_line_error(*cli(capsys, "train", "--resume", run, "--rho", "0.2")[::2])
    assert "--rho" in line
    shutil.rmtree(run)


# ----------------------------------------------------------------- section 4: sizes nothing bounded


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--model", "mlp", "--model-arg", "depth=100000"], "--model-arg depth"),
        (["--model", "mlp", "--model-arg", "width=100000000"], "--model-arg width"),
        (["--model", "resnet20", "--image-size", "4096"], "--image-size"),
        (["--model", "mlp", "--model-arg", "width=65536", "--model-arg", "depth=200"], "model's size"),
        (["--model", "resnet18", "--image-size", "256", "--batch-size", "1048576"], "--batch-size"),
    ],
)
def test_a_run_that_cannot_fit_is_refused_before_anything_is_allocated(capsys, tmp_path, fmnist_dir, flags, words):
    out = tmp_path / "run"
    line = one_line_error(
        *cli(
            capsys,
            "train",
            "--data-dir",
            fmnist_dir,
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--limit-test",
            "10",
            *flags,
            "--out",
            out,
            "--quiet",
        )[::2]
    )
    assert words in line, line
    assert not out.exists()


def test_an_allocation_that_fails_anyway_is_exit_1_with_one_line_and_no_folder(
    capsys, tmp_path, fmnist_dir, monkeypatch
):
    import torch

    import varprune.tasks.classification as classification

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(classification.F, "cross_entropy", out_of_memory)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *TINY, "--data-dir", fmnist_dir, "--out", out)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "out of memory" in lines[0] and "Traceback" not in err, err
    assert "nothing was kept" in lines[0]
    assert not out.exists()
