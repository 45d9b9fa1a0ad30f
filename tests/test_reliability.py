"""Issue 5, reliability: crash-safe checkpoints and resume, non-finite training,
run folders that are never silently replaced, validation before any work, clean
errors for damaged inputs, and ``varprune doctor``.

The kill tests run the real command line in a subprocess and SIGKILL it at
chosen moments (before, during and after a checkpoint write, during the first
write of config.json, and at a timed moment), resume
it with ``varprune train --resume`` and require the final weights, the final
checkpoint (optimizer and method state, RNG) and the metrics to equal those of
an uninterrupted run bitwise. A subprocess costs ~5 s here (importing torch and
torch._dynamo, which torch.optim pulls in), so the uninterrupted references and
the final resumes run in this process and each kill is one subprocess; the runs
are tiny (an MLP on 128 synthetic Fashion-MNIST-shaped images).
"""

import dataclasses
import fcntl
import gzip
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from varprune.cli import main
from varprune.engine.sweep import SweepSpec, finished_sweep
from varprune.models import create_model
from varprune.storage.checkpoint import load_checkpoint, save_weights

SRC = str(Path(__file__).resolve().parents[1] / "src")
EPOCHS, N_TRAIN, N_TEST, BATCH = 3, 128, 100, 64
STEPS = N_TRAIN // BATCH

# Runs the CLI with hooks: VP_PAUSE="WHEN:FILE:N" stops the process before, in the middle of
# (half the bytes in the temporary file) or after the N-th atomic write of FILE, and writes
# VP_MARKER so the test can SIGKILL it there.
DRIVER = r"""
import os, sys, tempfile, time
from pathlib import Path
import varprune.storage.files as ck

def pause():
    Path(os.environ["VP_MARKER"]).write_text("paused")
    time.sleep(600)

spec = os.environ.get("VP_PAUSE")
if spec:
    when, target, nth = spec.split(":")
    real, count = ck.atomic_write_bytes, [0]
    def hooked(path, data):
        if Path(path).name == target:
            count[0] += 1
            if count[0] == int(nth):
                if when == "before":
                    pause()
                if when == "mid":
                    pre = f".{Path(path).name}{ck.TMP_TAG}"
                    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=pre, suffix=".tmp")
                    os.write(fd, data[: len(data) // 2])
                    os.fsync(fd)
                    pause()
                real(path, data)
                if when == "after":
                    pause()
                return
        real(path, data)
    ck.atomic_write_bytes = hooked

from varprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fmnist(root: Path, n_train=N_TRAIN, n_test=N_TEST) -> Path:
    """Fashion-MNIST-shaped IDX files whose classes are learnable (a bright band per class)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 100, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(y):
            x[i, 2 + 2 * label : 4 + 2 * label] = 250
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x), compresslevel=1))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y), compresslevel=1))
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fake_fmnist(tmp_path_factory.mktemp("fmnist"))


def tiny(data_dir: Path, method="sgd", epochs=EPOCHS) -> list[str]:
    return [
        "--model",
        "mlp",
        "--method",
        method,
        "--epochs",
        str(epochs),
        "--batch-size",
        str(BATCH),
        *(["--var-lambda", "1e-4"] if "var" in method else []),
        "--device",
        "cpu",
        "--quiet",
        "--data-dir",
        str(data_dir),
    ]


def env(**extra) -> dict:
    out = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out.update({k: str(v) for k, v in extra.items()})
    return out


def kill_when_paused(args, pause: str, tmp_path: Path) -> float:
    """Run the CLI until it reaches ``pause`` (see DRIVER), SIGKILL it there; return the seconds it took."""
    marker = tmp_path / f"paused-{time.monotonic_ns()}"
    t0 = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *map(str, args)],
        env=env(VP_PAUSE=pause, VP_MARKER=marker),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    try:
        while not marker.exists():
            if p.poll() is not None:
                pytest.fail(f"{args} exited with {p.returncode} before pausing at {pause}: {p.stderr.read()}")
            assert time.monotonic() < deadline, f"{args} never reached {pause}"
            time.sleep(0.02)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stderr.close()
    return time.monotonic() - t0


def kill_after(args, seconds: float) -> int | None:
    """SIGKILL the CLI ``seconds`` after its start (None: killed; else it had already exited)."""
    p = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *map(str, args)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        return p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return None


def resume(run: Path, args: list[str]) -> None:
    """What a user does after a crash: --resume, or a fresh start if the run never got a config.json."""
    argv = ["train", "--resume", str(run)] if (run / "config.json").exists() else ["train", *args, "--out", str(run)]
    assert main(argv) == 0


def metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        m.pop("epoch_time_s")  # the only field that differs by nature
    return lines


def tensors_and_metadata(path: Path) -> tuple[dict, dict]:
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return st_load(raw), header.get("__metadata__", {})


def assert_same_run(run: Path, ref: Path) -> None:
    # tensors and metadata, not bytes: safetensors writes the metadata map in no fixed order
    for name in ("model.safetensors", "checkpoint.safetensors"):  # weights; optimizer, method state, RNG
        (a, meta_a), (b, meta_b) = tensors_and_metadata(run / name), tensors_and_metadata(ref / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        if name == "model.safetensors":
            assert meta_a == meta_b
    assert metrics(run) == metrics(ref) and len(metrics(ref)) == EPOCHS
    assert not list(run.glob(".*.tmp"))


def reference(root: Path, data_dir: Path, method: str) -> Path:
    """An uninterrupted run (in this process; see the module docstring)."""
    if not (root / method / "model.safetensors").exists():
        assert main(["train", *tiny(data_dir, method), "--out", str(root / method)]) == 0
    return root / method


@pytest.fixture(scope="module")
def refs(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("refs")
    for method in ("sgd", "var"):
        reference(root, data_dir, method)
    return root


def test_kill_during_config_checkpoint_and_training_then_resume_is_bitwise_identical(refs, data_dir, tmp_path):
    args = tiny(data_dir, "sgd")
    run = tmp_path / "run"
    # killed while writing config.json of a brand-new run: nothing to resume, and --resume says what to do
    startup = kill_when_paused(["train", *args, "--out", run], "mid:config.json:1", tmp_path)
    assert not (run / "config.json").exists() and list(run.glob(".config.json.*.tmp"))
    assert main(["train", "--resume", str(run)]) == 2
    # the same command again starts it cleanly; killed in the middle of writing epoch 2's checkpoint
    kill_when_paused(["train", *args, "--out", run], "mid:checkpoint.safetensors:2", tmp_path)
    assert load_checkpoint(run / "checkpoint.safetensors")["epoch"] == 1 and list(run.glob(".*.tmp"))
    # resumed, killed at a timed moment (just after start-up: loading, or early in training)
    kill_after(["train", "--resume", run], startup + 0.2)
    resume(run, args)
    assert_same_run(run, refs / "sgd")
    assert main(["train", "--resume", str(run)]) == 0  # a finished run stays finished
    assert_same_run(run, refs / "sgd")


def test_kill_before_first_checkpoint_and_between_checkpoint_and_metrics(refs, data_dir, tmp_path):
    args = tiny(data_dir, "var")
    run = tmp_path / "run"
    # killed before the first checkpoint: --resume starts from scratch with config.json
    kill_when_paused(["train", *args, "--out", run], "before:checkpoint.safetensors:1", tmp_path)
    assert (run / "config.json").exists() and not (run / "checkpoint.safetensors").exists()
    # killed after epoch 2's checkpoint, before metrics.jsonl caught up with it
    kill_when_paused(["train", "--resume", run], "after:checkpoint.safetensors:2", tmp_path)
    assert load_checkpoint(run / "checkpoint.safetensors")["epoch"] == 2 and len(metrics(run)) == 1
    resume(run, args)
    assert_same_run(run, refs / "var")


def test_crash_while_writing_the_final_weights_is_resumed(refs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(refs / "var", run)
    (run / "model.safetensors").unlink()  # an atomic write killed midway leaves no file, only a temporary one
    (run / ".model.safetensors.varprune-abc123xy.tmp").write_bytes(b"half")
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_run(run, refs / "var")


def test_s2sam_method_state_survives_a_kill(data_dir, tmp_path):
    pytest.importorskip("varprune.optim")
    args = tiny(data_dir, "s2sam")
    ref = reference(tmp_path, data_dir, "s2sam")
    run = tmp_path / "run"
    kill_when_paused(["train", *args, "--out", run], "after:checkpoint.safetensors:1", tmp_path)
    resume(run, args)
    assert_same_run(run, ref)


def test_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_resumes(
    refs, data_dir, tmp_path, capsys, monkeypatch
):
    import types

    import torch.nn.functional as F

    import varprune.tasks

    calls = [0]

    def poisoned(*a, **k):  # the cross-entropy of epoch 2, step 2 is NaN
        calls[0] += 1
        out = F.cross_entropy(*a, **k)
        return out * float("nan") if calls[0] == STEPS + 2 else out

    shim = types.ModuleType("F")
    shim.__dict__.update(F.__dict__)
    shim.cross_entropy = poisoned
    monkeypatch.setattr(varprune.tasks.classification, "F", shim)
    args = tiny(data_dir, "sgd")
    run = tmp_path / "run"
    assert main(["train", *args, "--out", str(run)]) == 3
    err = one_line(capsys)
    assert f"non-finite loss at epoch 2, step 2 of {STEPS}" in err and "kept the checkpoint of epoch 1" in err
    assert load_checkpoint(run / "checkpoint.safetensors")["epoch"] == 1
    assert len(metrics(run)) == 1 and not (run / "model.safetensors").exists()
    monkeypatch.undo()
    resume(run, args)  # the kept state is intact: resuming (without the fault) ends exactly like the reference
    assert_same_run(run, refs / "sgd")


def test_diverging_run_exits_3_naming_epoch_and_step(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    # the largest settings the configuration allows diverge (a learning rate of 1e9 is refused outright)
    assert (
        main(
            [
                "train",
                *tiny(data_dir, "sgd", epochs=6),
                "--lr",
                "10",
                "--momentum",
                "0.99",
                "--weight-decay",
                "1",
                "--warmup-epochs",
                "0",
                "--out",
                str(run),
            ]
        )
        == 3
    )
    err = one_line(capsys)
    found = re.search(rf"non-finite (loss|weights) at epoch (\d), step (\d) of {STEPS}", err)
    assert found, err
    epoch = int(found[2])
    if epoch == 1:
        assert "holds no checkpoint" in err and not (run / "checkpoint.safetensors").exists()
    else:
        assert load_checkpoint(run / "checkpoint.safetensors")["epoch"] == epoch - 1
    assert not (run / "model.safetensors").exists()


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("varprune: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_validation_reports_every_problem_before_any_work(tmp_path, capsys):
    out = tmp_path / "x"
    rc = main(
        [
            "train",
            "--out",
            str(out),
            "--var-lambda",
            "-1",
            "--var-r",
            "0",
            "--var-eps=-1e-8",
            "--epochs",
            "0",
            "--batch-size",
            "0",
            "--model",
            "resnet1000",
            "--method",
            "adamw",
            "--cram-sparsities",
            "0.5,0.5",
            "--lr",
            "nan",
            "--amp",
            "fp8",
            "--data-dir",
            str(tmp_path / "none"),
        ]
    )
    assert rc == 2
    err = one_line(capsys)
    for expected in (
        "--var-lambda must be in [0",
        "--var-r must be in (0",
        "--var-eps must be in (0",
        "--epochs must be in [1",
        "--batch-size must be in [1",
        "unknown model 'resnet1000'",
        "unknown method 'adamw'",
        "--cram-sparsities must be unique",
        "--lr must be in (0",
        "unknown --amp 'fp8'",
        "fashion-mnist not found",
    ):
        assert expected in err
    assert not out.exists()
    assert main(["prune", str(tmp_path / "a"), str(tmp_path / "b"), "--bnt-batches", "-1"]) == 2
    err = one_line(capsys)
    assert "--bnt-batches" in err and "a is not a varprune run folder" in err and "b is not" in err
    for bad in ("0.5,0.5", "0.5,1", "-0.1", "nan"):
        assert main(["prune", str(tmp_path / "a"), "--sparsities", bad]) == 2
        assert "sparsities must" in one_line(capsys)
    assert main(["train", "--resume", str(tmp_path / "a"), "--epochs", "3"]) == 2
    assert "drop --epochs" in one_line(capsys)


@pytest.fixture
def run_copy(refs, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(refs / "sgd", run)
    return run


def test_existing_run_folder_is_never_silently_replaced(run_copy, data_dir, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    assert main(["train", *tiny(data_dir), "--out", str(run_copy)]) == 2
    assert "already holds a run" in one_line(capsys)
    assert before == {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    (tmp_path / "file").write_text("x")
    assert main(["train", *tiny(data_dir), "--out", str(tmp_path / "file")]) == 2
    assert "not a folder" in one_line(capsys)
    # a folder being trained by another process is refused
    with open(run_copy / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert main(["train", "--resume", str(run_copy)]) == 2
        assert "another varprune process" in one_line(capsys)
    # --overwrite replaces the run and drops the prune results made from its old weights
    (run_copy / "prune.json").write_text("{}")
    assert main(["train", *tiny(data_dir, epochs=1), "--out", str(run_copy), "--overwrite"]) == 0
    assert not (run_copy / "prune.json").exists() and len(metrics(run_copy)) == 1


def test_damaged_or_foreign_checkpoints_are_one_line_exit_2(run_copy, refs, tmp_path, capsys):
    ckpt = run_copy / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    os.remove(run_copy / "model.safetensors")
    cases = [
        (good[: len(good) // 3], "not a readable safetensors file"),  # truncated
        (good[:7], "not a readable safetensors file"),
        (b"\x00" * 100, "not a readable safetensors file"),
        (st_save({"w": torch.ones(2)}), "not a varprune checkpoint"),  # foreign
        ((refs / "var" / "checkpoint.safetensors").read_bytes(), "belongs to another run"),  # another run
    ]
    for raw, expected in cases:
        ckpt.write_bytes(raw)
        assert main(["train", "--resume", str(run_copy)]) == 2, expected
        assert expected in one_line(capsys)
    ckpt.write_bytes(good)
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["train"]["model"] = "resnet20"  # a checkpoint of another model than the config says
    (run_copy / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert "belongs to another run" in one_line(capsys)
    (run_copy / "config.json").write_text(json.dumps({"train": {"epochs": "three", "bogus": 1}}))
    assert main(["train", "--resume", str(run_copy)]) == 2
    err = one_line(capsys)
    assert "unknown keys ['bogus']" in err and "epochs must be int" in err


def test_prune_rejects_weights_of_another_model(run_copy, capsys):
    weights = run_copy / "model.safetensors"
    save_weights(weights, create_model("resnet20", 1, 10, 28), {"model": "resnet20", "dataset": "fashion-mnist"})
    assert main(["prune", str(run_copy), "--sparsities", "0.5"]) == 2
    assert "weights of model 'resnet20', not 'mlp'" in one_line(capsys)
    save_weights(weights, create_model("resnet20", 1, 10, 28), {})
    assert main(["prune", str(run_copy), "--sparsities", "0.5"]) == 2
    assert "does not fit this model" in one_line(capsys)


def test_interrupted_prune_sweep_resumes_and_never_touches_checkpoints(refs, tmp_path, capsys):
    runs = [tmp_path / "sgd", tmp_path / "var"]
    for run in runs:
        shutil.copytree(refs / run.name, run)
    before = {p: p.read_bytes() for r in runs for p in (r / "model.safetensors", r / "checkpoint.safetensors")}
    args = [
        "prune",
        *map(str, runs),
        "--sparsities",
        "0.5,0.9",
        "--bnt-batches",
        "1",
        "--bnt-batch-size",
        "64",
        "--plot",
        str(tmp_path / "both.png"),
    ]
    assert main(args) == 0
    same = SweepSpec(sparsities=(0.5, 0.9), bnt_batches=1, bnt_batch_size=64)
    assert finished_sweep(runs[0], same) is not None
    for other in (
        dict(sparsities=(0.5,)),
        dict(scope="layerwise"),
        dict(exclude=("last",)),
        dict(bnt_batches=2),
        dict(pruners=("magnitude", "wanda")),
        dict(patterns=("2:4",)),
    ):
        assert finished_sweep(runs[0], dataclasses.replace(same, **other)) is None  # other settings: swept again
    first = (runs[0] / "prune.json").read_text()
    (runs[1] / "prune.json").unlink()  # as if the sweep had been killed while pruning the second run
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"reusing {runs[0] / 'prune.json'}" in out and f"pruning {runs[1]}" in out
    assert (runs[0] / "prune.json").read_text() == first and (runs[1] / "prune.json").exists()
    assert main(["prune", str(runs[0]), *args[3:-2], "--force"]) == 0  # --force sweeps a finished run again
    out = capsys.readouterr().out
    assert "reusing" not in out and f"pruning {runs[0]}" in out
    assert before == {p: p.read_bytes() for p in before}
    shutil.copy(runs[1] / "model.safetensors", runs[0] / "model.safetensors")  # retrained weights: swept again
    assert finished_sweep(runs[0], same) is None


def test_corrupted_dataset_files_are_one_line_exit_2(tmp_path, capsys):
    cases = {
        "wrong IDX magic": lambda raw: b"\x00\x00\x09\x03" + raw[4:],
        "short read": lambda raw: raw[: len(raw) - 100],
        "not gzip": lambda raw: b"garbage",
    }
    for i, (what, damage) in enumerate(cases.items()):
        root = write_fake_fmnist(tmp_path / f"d{i}", n_train=64, n_test=10)
        path = root / "train-images-idx3-ubyte.gz"
        raw = damage(gzip.decompress(path.read_bytes()))
        path.write_bytes(raw if what == "not gzip" else gzip.compress(raw))
        assert main(["train", *tiny(root, epochs=1), "--out", str(tmp_path / f"run{i}")]) == 2, what
        assert "train-images-idx3-ubyte.gz" in one_line(capsys)
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0, 1, 2, 3]}  # wrong layout
        (cifar / name).write_bytes(pickle.dumps(batch))
    assert (
        main(
            [
                "train",
                "--dataset",
                "cifar10",
                "--model",
                "mlp",
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--data-dir",
                str(tmp_path / "cifar"),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "expected (N, 3072)" in one_line(capsys)


def test_doctor_prints_the_environment(data_dir, tmp_path, capsys):
    assert main(["doctor", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert f"torch:          {torch.__version__}" in out and "CUDA:" in out and "--device auto:" in out
    assert re.search(rf"\n  fashion-mnist +found in {re.escape(str(data_dir))}", out)
    assert re.search(rf"\n  cifar10 +not found in {re.escape(str(data_dir))}", out)
    # one column for every dataset's status, the longest name (text-classification) included
    rows = [re.match(r"  (\S+)( +)(found|not found|incomplete) ", line) for line in out.splitlines()]
    rows = [m for m in rows if m]
    assert len(rows) >= 10 and len({m.start(3) for m in rows}) == 1, out
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn"):
        assert f"  {name} " in out
