"""Issue 19, section 7: what varprune says when something goes wrong is true, and the fix it names works."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import SWEEP, TINY, cli, one_line_error, train_tiny

SRC = str(Path(__file__).resolve().parents[1] / "src")


def as_from_a_shell() -> None:
    """In the child before exec: SIGINT at its default and no signal blocked, as a terminal starts a command. Under
    the whole suite a child of a pytest-xdist worker once ignored SIGINT and trained to the end (exit 0); the
    worker's handler and mask looked unchanged at test boundaries, so the state is reset here, not trusted."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(*args):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "varprune", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_shell,
    )


def signal_state(pid: int) -> str:
    """The child's ignored and blocked signals as the kernel reports them (for a failure's message)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "?"
    return " ".join(line.replace("\t", "") for line in lines if line.startswith(("SigIgn", "SigBlk", "SigCgt")))


def until(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, fmnist_dir):
    return train_tiny(tmp_path_factory.mktemp("messages") / "run", fmnist_dir)


@pytest.fixture
def run(shared, tmp_path):
    return shutil.copytree(shared, tmp_path / "run", symlinks=True)


# the whole training set at batch 64: the first epoch takes seconds, long enough to be stopped in
SLOW = ["--model", "mlp", "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopped_before_the_first_epoch_says_nothing_was_kept(tmp_path, fmnist_dir, sig):
    out = tmp_path / "run"
    proc = spawn("train", *SLOW, "--data-dir", fmnist_dir, "--out", out)
    try:
        until(lambda: (out / "config.json").exists(), proc)
        t0, state = time.monotonic(), signal_state(proc.pid)
        proc.send_signal(sig)
        stdout, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    seen = sorted(p.name for p in out.iterdir()) if out.exists() else None
    said = f"exit after {time.monotonic() - t0:.2f} s ({state}); stdout {stdout!r}; stderr {err!r}; {out}: {seen}"
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), said
    last = err.strip().splitlines()[-1]
    assert "nothing was kept" in last and "--resume" not in last, last
    assert not out.exists()


def test_stopped_during_an_overwrite_says_the_previous_run_was_restored(run, fmnist_dir):
    before = (run / "model.safetensors").read_bytes()
    proc = spawn("train", *SLOW, "--data-dir", fmnist_dir, "--out", run, "--overwrite")
    try:
        until(
            lambda: (
                (run / ".varprune-replacing").exists()
                and "moved" in (run / ".varprune-replacing").read_text()
                and (run / "config.json").exists()
            ),
            proc,
        )
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert "previous run" in last and "restored" in last and "completed epochs" not in last, last
    assert (run / "model.safetensors").read_bytes() == before


def test_tune_prints_a_command_that_trains_with_the_tuned_optimizer(capsys, tmp_path, fmnist_dir):
    rc, out, err = cli(
        capsys,
        "tune",
        "--out",
        tmp_path / "t",
        *TINY,
        "--data-dir",
        fmnist_dir,
        "--sparsity",
        "0.5",
        "--grid",
        "1",
        "--baseline",
        "none",
        "--optimizer",
        "adamw",
        "--lr",
        "0.003",
        "--bnt-batches",
        "2",
        "--bnt-batch-size",
        "64",
    )
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.strip().startswith("varprune train"))
    assert "--optimizer adamw" in line and "--lr 0.003" in line


def test_batch_size_one_with_batchnorm_is_refused_up_front(capsys, tmp_path, fmnist_dir, run):
    line = one_line_error(
        *cli(capsys, "train", *TINY, "--data-dir", fmnist_dir, "--batch-size", "1", "--out", tmp_path / "x")[::2]
    )
    assert "--batch-size 1" in line and "BatchNorm" in line
    line = one_line_error(*cli(capsys, "prune", run, "--bnt-batch-size", "1")[::2])
    assert "--bnt-batch-size" in line
    line = one_line_error(*cli(capsys, "analyze", run, "--out", tmp_path / "a", "--bnt-batch-size", "1")[::2])
    assert "--bnt-batch-size" in line and not (tmp_path / "a").exists()


@pytest.mark.parametrize("iters", ["0", "-1"])
def test_analyze_checks_every_flag_before_writing_anything(capsys, run, tmp_path, iters):
    out = tmp_path / "analysis"
    line = one_line_error(*cli(capsys, "analyze", run, "--out", out, "--hessian-iters", iters)[::2])
    assert "--hessian-iters" in line
    assert not out.exists()


def test_an_init_file_torch_refuses_is_one_clean_line(capsys, tmp_path, fmnist_dir):
    bad = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), bad)  # a pickled module, not a state dict
    rc, _, err = cli(capsys, "train", *TINY, "--data-dir", fmnist_dir, "--init", bad, "--out", tmp_path / "x")
    line = one_line_error(rc, err)
    assert "\x1b" not in err and "weights_only=False" not in err and "state_dict" in line, err
    assert len(line) < 400


def test_hints_name_commands_that_work(capsys, tmp_path, fmnist_dir, run):
    study = tmp_path / "study"
    rc, _, err = cli(
        capsys, "study", "--out", study, *TINY, "--data-dir", fmnist_dir, "--methods", "sgd", "--no-analysis", *SWEEP
    )
    assert rc == 0, err
    line = one_line_error(*cli(capsys, "prune", study)[::2])
    assert "study folder" in line and "varprune prune" not in line and f"varprune report {study}" in line, line
    shutil.copy(run / "model.safetensors", tmp_path / "weights.safetensors")
    assert cli(capsys, "export", run, "--sparsity", "0.5", "--bnt-batches", "0", "--out", tmp_path / "p.st")[0] == 0
    shutil.copy(tmp_path / "p.st", run / "model.safetensors")
    line = one_line_error(*cli(capsys, "prune", run, *SWEEP, "--force")[::2])
    assert "varprune export" in line and "dataset" not in line
