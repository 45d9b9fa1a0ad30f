"""Red-team items of issue 8, end to end through the command line (cli.main in-process, or a
subprocess where a signal or a broken import is the point): nothing a user wrote is lost, bad
input is one line with exit 2, and what was promised is kept.

One tiny mlp run is trained once for the module and copied by every test that changes it.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from varprune import cli
from varprune.storage.checkpoint import load_checkpoint, save_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
PNG = b"\x89PNG\r\n\x1a\n"
TINY = [
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
]
SWEEP = ["--sparsities", "0.5,0.9", "--bnt-batches", "2", "--bnt-batch-size", "64"]


def vp(capsys, *args):
    """``varprune ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc, err, code=2):
    assert rc == code, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("varprune: error:") and "Traceback" not in err, err
    return lines[0]


def spawn(*args, **kw):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "varprune", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def wait_for(predicate, proc, timeout=180.0, step=0.002):
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the process ended first: {proc.communicate()}"
        assert time.monotonic() < end, "timed out"
        time.sleep(step)


def snapshot(folder: Path) -> dict:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def idx_file(shape) -> bytes:
    n = 1
    for s in shape:
        n *= s
    return bytes([0, 0, 8, len(shape)]) + b"".join(s.to_bytes(4, "big") for s in shape) + bytes(n)


def data_copy(fmnist: Path, dest: Path) -> Path:
    """A folder of links to the Fashion-MNIST files (to rename, truncate or empty one of them)."""
    dest.mkdir()
    for f in fmnist.iterdir():
        if "ubyte" in f.name:
            (dest / f.name).symlink_to(f.resolve())
    return dest


def replace_file(folder: Path, stem: str, data: bytes) -> None:
    for f in folder.glob(stem + "*"):
        f.unlink()
    (folder / stem).write_bytes(data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fmnist_dir):
    """A finished tiny run with its sweep (prune.json/csv/png)."""
    run = tmp_path_factory.mktemp("shared") / "run"
    assert cli.main(["train", *TINY, "--data-dir", str(fmnist_dir), "--out", str(run)]) == 0
    assert cli.main(["prune", str(run), *SWEEP]) == 0
    return run


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the shared run."""
    return Path(shutil.copytree(trained, tmp_path / "run", symlinks=True))


# ----------------------------------------------------------------- 7: no data loss without --overwrite


def test_user_files_named_like_ours_survive_train_and_study(capsys, tmp_path, fmnist_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    user = {
        "prune.json": b'{"my": "notes"}',
        "prune.png": b"not a plot",
        ".notes.tmp": b"draft",
        ".prune.json.abcd1234.tmp": b"a user's temporary file, named like ours",
    }
    for name, data in user.items():
        (mine / name).write_bytes(data)
    line = one_line(*vp(capsys, "train", *TINY, "--data-dir", fmnist_dir, "--out", mine)[::2])
    assert "did not make" in line and "prune.json" in line
    assert snapshot(mine) == user  # nothing written, nothing deleted

    # a folder of the user's without varprune's names: the run goes in, the user's files stay
    (mine / "prune.json").unlink()
    (mine / "prune.png").unlink()
    rc, _, err = vp(capsys, "train", *TINY, "--data-dir", fmnist_dir, "--out", mine)
    assert rc == 0, err
    assert (mine / "model.safetensors").is_file()
    assert (mine / ".notes.tmp").read_bytes() == b"draft"
    assert (mine / ".prune.json.abcd1234.tmp").read_bytes() == user[".prune.json.abcd1234.tmp"]

    # the same inside a study's runs/METHOD-sSEED
    study = tmp_path / "study"
    inside = study / "runs" / "sgd-s0"
    inside.mkdir(parents=True)
    (inside / "prune.json").write_bytes(b"mine")
    (inside / ".notes.tmp").write_bytes(b"draft")
    args = [a for a in TINY if a != "--quiet"]
    line = one_line(
        *vp(
            capsys,
            "study",
            "--out",
            study,
            *args,
            "--data-dir",
            fmnist_dir,
            "--methods",
            "sgd",
            "--no-analysis",
            *SWEEP,
        )[::2]
    )
    assert "did not make" in line
    assert snapshot(inside) == {"prune.json": b"mine", ".notes.tmp": b"draft"}


# ----------------------------------------------------------------- 8: no data loss with --overwrite


def test_overwrite_that_fails_before_its_first_checkpoint_keeps_the_old_run(capsys, run, tmp_path, fmnist_dir):
    (run / ".notes.tmp").write_bytes(b"draft")
    (run / "notes.txt").write_bytes(b"mine")
    before = snapshot(run)
    assert {"model.safetensors", "checkpoint.safetensors", "prune.json", "prune.png"} <= set(before)

    # truncated data: fails while loading, before anything is moved
    broken = data_copy(fmnist_dir, tmp_path / "truncated")
    raw = (fmnist_dir / "train-images-idx3-ubyte.gz").read_bytes()
    (broken / "train-images-idx3-ubyte.gz").unlink()
    (broken / "train-images-idx3-ubyte.gz").write_bytes(raw[:5000])
    line = one_line(*vp(capsys, "train", *TINY, "--data-dir", broken, "--out", run, "--overwrite")[::2])
    assert "train-images-idx3-ubyte.gz" in line
    assert snapshot(run) == before and not list(run.glob(".replaced-run*"))

    # diverges in the first epoch: the old run was moved aside, and is put back byte for byte
    rc, out, err = vp(
        capsys,
        "train",
        *TINY,
        "--method",
        "var",
        "--var-lambda",
        "1e6",
        "--lr",
        "10",
        "--warmup-epochs",
        "0",
        "--data-dir",
        fmnist_dir,
        "--out",
        run,
        "--overwrite",
    )
    assert rc == 3 and "non-finite" in err, err
    assert "previous run" in out and "restored" in out
    assert snapshot(run) == before and not list(run.glob(".replaced-run*"))

    # 65 examples in batches of 64: the last batch of one is dropped (BatchNorm), the new run replaces the old
    rc, _, err = vp(
        capsys,
        "train",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--limit-train",
        "65",
        "--batch-size",
        "64",
        "--limit-test",
        "128",
        "--device",
        "cpu",
        "--quiet",
        "--data-dir",
        fmnist_dir,
        "--out",
        run,
        "--overwrite",
    )
    assert rc == 0, err
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["train_examples"] == 65 and resolved["steps_per_epoch"] == 1
    assert (run / "model.safetensors").read_bytes() != before["model.safetensors"]
    assert not (run / "prune.json").exists()  # made from the old weights: gone with them
    assert (run / ".notes.tmp").read_bytes() == b"draft" and (run / "notes.txt").read_bytes() == b"mine"
    assert not list(run.glob(".replaced-run*"))


def test_overwrite_killed_before_its_first_checkpoint_is_undone_by_train_resume_only(capsys, run, fmnist_dir):
    """Readers (prune, report) refuse a half-replaced run and touch nothing; `train --resume` puts the previous
    run back, acting only on what the killed --overwrite recorded."""
    (run / ".notes.tmp").write_bytes(b"draft")
    before = snapshot(run)
    # the whole training set: the first epoch takes seconds, long enough to be killed in
    proc = spawn(
        "train",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--quiet",
        "--data-dir",
        fmnist_dir,
        "--out",
        run,
        "--overwrite",
    )
    try:
        wait_for(
            lambda: (
                (run / ".varprune-replacing").exists()
                and (run / "config.json").exists()
                and '"moved"' in (run / ".varprune-replacing").read_text()
            ),
            proc,
        )
    finally:
        proc.kill()
        proc.communicate()
    assert not (run / "checkpoint.safetensors").exists() and not (run / "model.safetensors").exists()
    (run / ".config.json.varprune-k1lled00.tmp").write_bytes(b"")  # as if killed inside the config.json write
    half = snapshot(run)
    for command in (
        ["prune", run, *SWEEP],
        ["report", run],
        ["export", run, "--sparsity", "0.5", "--out", run.parent / "x.safetensors"],
    ):
        line = one_line(*vp(capsys, *command)[::2])
        assert "half replaced" in line and f"varprune train --resume {run}" in line, line
        assert snapshot(run) == half
    rc, out, err = vp(capsys, "train", "--resume", run)
    assert rc == 0, err
    assert snapshot(run) == before and not list(run.glob(".replaced-run*"))
    rc, out, err = vp(capsys, "prune", run, *SWEEP)  # the old run is back, its sweep still valid
    assert rc == 0 and "reusing" in out, err


def test_a_folder_named_like_the_aside_folder_is_never_touched(capsys, run, tmp_path, fmnist_dir):
    """No record of varprune's, no recovery: train, prune and report leave a user's .replaced-run alone."""
    for folder in (run, tmp_path / "mine"):
        folder.mkdir(exist_ok=True)
        (folder / ".replaced-run").mkdir()
        (folder / ".replaced-run" / "config.json").write_bytes(b"user's")
        (folder / ".replaced-run-abcdefgh").mkdir()
        (folder / ".replaced-run-abcdefgh" / "notes.txt").write_bytes(b"user's")
    before = snapshot(run)
    assert vp(capsys, "report", run)[0] == 0
    assert vp(capsys, "prune", run, *SWEEP)[0] == 0
    assert snapshot(run) == before
    mine = tmp_path / "mine"
    rc, _, err = vp(capsys, "train", *TINY, "--data-dir", fmnist_dir, "--out", mine)
    assert rc == 0, err
    assert (mine / ".replaced-run" / "config.json").read_bytes() == b"user's"
    assert (mine / ".replaced-run-abcdefgh" / "notes.txt").read_bytes() == b"user's"


def test_resume_deletes_only_its_own_temporaries(capsys, run):
    (run / ".model.safetensors.my-backup.tmp").write_bytes(b"user's")
    (run / ".config.json.varprune-abcd1234.tmp").write_bytes(b"half")
    rc, _, err = vp(capsys, "train", "--resume", run)
    assert rc == 0, err
    assert (run / ".model.safetensors.my-backup.tmp").read_bytes() == b"user's"
    assert not (run / ".config.json.varprune-abcd1234.tmp").exists()


# ----------------------------------------------------------------- 9: --bnt-batches 0


def test_bnt_batches_zero_skips_retuning(capsys, trained, run):
    with_bnt = json.loads((trained / "prune.json").read_text())
    assert any(r["accuracy"] != r["accuracy_bnt"] for r in with_bnt["results"])  # re-tuning changes something
    rc, _, err = vp(capsys, "prune", run, "--sparsities", "0.5,0.9", "--bnt-batches", "0")
    assert rc == 0, err
    doc = json.loads((run / "prune.json").read_text())
    assert doc["bnt_batches"] == 0 and doc["timing"]["bnt_s"] == 0
    # nothing was re-tuned: no "after re-tuning" values that would only repeat the others
    assert doc["bn_retuning"] is False and "--bnt-batches 0" in doc["bn_retuning_note"]
    assert all("accuracy_bnt" not in r for r in doc["results"])
    assert [r["accuracy"] for r in doc["results"]] == [r["accuracy"] for r in with_bnt["results"]]


# ----------------------------------------------------------------- 10: typos, interrupted sweeps, damaged files


def test_exclude_typo_is_refused_and_list_weights_names_every_matrix(capsys, trained):
    before = snapshot(trained)
    line = one_line(*vp(capsys, "prune", trained, "--exclude", "fisrt")[::2])
    assert "'fisrt'" in line and "--list-weights" in line
    assert snapshot(trained) == before

    rc, out, err = vp(capsys, "prune", trained, "--list-weights")
    assert rc == 0, err
    from varprune.models import create_model
    from varprune.numerics.weights import classify_parameters

    model = create_model("mlp", 1, 10, 28)
    expected = classify_parameters(model)
    rows = [line.split() for line in out.strip().splitlines()]
    shapes = dict(model.named_parameters())
    assert [r[0] for r in rows] == list(shapes)  # every parameter (issue 26 §7), not only the matrices
    for name, shape, label in ((r[0], r[1], " ".join(r[2:])) for r in rows):
        assert shape == "x".join(map(str, shapes[name].shape))
        if name in expected:
            assert label == (expected[name] if expected[name] == "prunable" else f"not pruned: {expected[name]}")
        else:
            assert shapes[name].dim() < 2 and label.startswith("not pruned: one-dimensional"), label
    assert snapshot(trained) == before  # listing sweeps nothing

    rc, out, _ = vp(capsys, "prune", trained, "--list-weights", "--exclude", "last")
    last = [n for n, label in expected.items() if label == "prunable"][-1]
    labels = {line.split()[0]: line for line in out.strip().splitlines()}
    assert rc == 0 and labels[last].endswith("excluded by --exclude")
    assert out.strip().splitlines()[0].endswith("prunable")


def test_sweep_interrupted_before_its_plot_is_redone(capsys, run):
    mtime = (run / "prune.json").stat().st_mtime_ns
    rc, out, _ = vp(capsys, "prune", run, *SWEEP)
    assert rc == 0 and "reusing" in out and (run / "prune.json").stat().st_mtime_ns == mtime
    (run / "prune.png").unlink()  # killed between prune.json and prune.png
    rc, out, err = vp(capsys, "prune", run, *SWEEP)
    assert rc == 0 and "reusing" not in out, err
    assert (run / "prune.png").read_bytes()[:8] == PNG


def flip_byte_in_tensor_data(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + (len(raw) - start) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_flipped_byte_in_weights_or_checkpoint_is_refused(capsys, trained, run):
    weights = (run / "model.safetensors").read_bytes()
    checkpoint = (run / "checkpoint.safetensors").read_bytes()
    flip_byte_in_tensor_data(run / "model.safetensors")
    line = one_line(*vp(capsys, "prune", run, "--force", *SWEEP)[::2])
    assert "model.safetensors" in line and "sha256" in line

    flip_byte_in_tensor_data(run / "checkpoint.safetensors")
    line = one_line(*vp(capsys, "train", "--resume", run)[::2])
    assert "checkpoint.safetensors" in line and "sha256" in line

    # as the message says: without the damaged weights, --resume rewrites them from the intact checkpoint
    (run / "checkpoint.safetensors").write_bytes(checkpoint)
    (run / "model.safetensors").unlink()
    rc, _, err = vp(capsys, "train", "--resume", run)
    assert rc == 0, err
    assert (run / "model.safetensors").read_bytes() == weights

    # a file of an older version, written by safetensors itself without a digest, still loads
    from safetensors.torch import load as st_load
    from safetensors.torch import save_file

    meta = json.loads(weights[8 : 8 + int.from_bytes(weights[:8], "little")])["__metadata__"]
    del meta["sha256"]
    save_file(st_load(weights), str(run / "model.safetensors"), metadata=meta)
    rc, _out, err = vp(capsys, "prune", run, "--force", *SWEEP)
    assert rc == 0, err

    def untimed(folder):  # each row's prune_s is a measured time: the rest must agree
        return [
            {k: v for k, v in r.items() if k != "prune_s"}
            for r in json.loads((folder / "prune.json").read_text())["results"]
        ]

    assert untimed(run) == untimed(trained)


def test_empty_splits_and_zero_image_idx_files_are_one_line(capsys, trained, tmp_path, fmnist_dir):
    for split, expected in (("t10k", "no test examples"), ("train", "0 training example")):
        data = data_copy(fmnist_dir, tmp_path / split)
        replace_file(data, f"{split}-images-idx3-ubyte", idx_file((0, 28, 28)))
        replace_file(data, f"{split}-labels-idx1-ubyte", idx_file((0,)))
        line = one_line(*vp(capsys, "train", *TINY, "--data-dir", data, "--out", tmp_path / "x")[::2])
        assert expected in line
        assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("*.json"))
        line = one_line(*vp(capsys, "prune", trained, "--force", "--data-dir", data, *SWEEP)[::2])
        assert expected in line


# ----------------------------------------------------------------- 11: one line instead of a traceback


@pytest.mark.parametrize(
    "extra",
    [
        ["--lr", "3.5e38"],
        ["--weight-decay", "1e30"],
        ["--method", "l1", "--l1-alpha", "1e30"],
        ["--method", "cram", "--rho", "1e39"],
        ["--warmup-epochs", "1e308"],
    ],
)
def test_huge_hyperparameters_are_refused(capsys, tmp_path, extra):
    line = one_line(*vp(capsys, "train", *TINY, *extra, "--out", tmp_path / "x")[::2])
    assert extra[-2] + " must be in" in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("device", ["mps", "xla", "meta", "hpu"])
def test_prune_on_unsupported_devices_is_refused(capsys, trained, device):
    line = one_line(*vp(capsys, "prune", trained, "--device", device)[::2])
    assert repr(device) in line and "cpu" in line


DAMAGED = [
    "[]",
    "[" * 100_000 + "]" * 100_000,
    '{"results": "many"}',
    '{"dense_accuracy": 1}',
    "not json",
    json.dumps({"results": [{"sparsity": "half", "accuracy": 1, "accuracy_bnt": 1}], "dense_accuracy": 1}),
]


@pytest.fixture
def study(capsys, trained, tmp_path, fmnist_dir):
    """A study of the shared run (copied in as runs/sgd-s0, so nothing is trained again)."""
    out = tmp_path / "study"
    shutil.copytree(trained, out / "runs" / "sgd-s0", symlinks=True)
    args = [
        "study",
        "--out",
        out,
        *[a for a in TINY if a != "--quiet"],
        "--data-dir",
        fmnist_dir,
        "--methods",
        "sgd",
        "--seeds",
        "0",
        "--no-analysis",
        *SWEEP,
    ]
    rc, out_text, err = vp(capsys, *args)
    assert rc == 0 and "reusing finished run" in out_text and "pruning /" not in out_text, err
    return out, args


def test_damaged_json_files_are_one_line(capsys, run, study):
    for text in DAMAGED:
        (run / "prune.json").write_text(text)
        line = one_line(*vp(capsys, "report", run)[::2])
        assert "prune.json" in line and "damaged or edited" in line

    folder, args = study
    report_md = (folder / "report.md").read_text()
    for name in ("study.json", "report.json"):
        old = (folder / name).read_bytes()
        for text in DAMAGED + ['{"study": {"methods": []}, "methods": {}}']:
            (folder / name).write_text(text)
            cmd = ["report", folder] if name == "report.json" else args
            line = one_line(*vp(capsys, *cmd)[::2])
            assert name in line
        (folder / name).write_bytes(old)
    (folder / "report.md").write_text("[]")  # report.md is written from report.json
    rc, out, _ = vp(capsys, "report", folder)
    assert rc == 0 and out == report_md
    rc, out, err = vp(capsys, "report", folder, "--html", folder / "page.html")
    assert rc == 0 and (folder / "page.html").read_text().startswith("<!"), err


def test_damaged_metrics_jsonl_names_the_file_and_the_line(capsys, study):
    folder, args = study
    metrics = folder / "runs" / "sgd-s0" / "metrics.jsonl"
    good = metrics.read_text()
    for text, where in (
        (good + "garbage\n", "line 2"),
        (good + "[]\n", "line 2"),
        ("", "no epoch record"),
        ('{"epoch": 1}\n', "line 1"),
        ("[" * 100_000 + "\n", "line 1"),
    ):
        metrics.write_text(text)
        line = one_line(*vp(capsys, *args)[::2])
        assert str(metrics) in line and where in line and "--resume" in line
    metrics.write_text(good)
    assert vp(capsys, *args)[0] == 0


def test_checkpoint_with_a_bad_momentum_buffer_is_refused(capsys, run):
    good = load_checkpoint(run / "checkpoint.safetensors")
    state = good["optimizer"]["state"]
    key = next(k for k, v in state.items() if isinstance(v.get("momentum_buffer"), torch.Tensor))
    buf = state[key]["momentum_buffer"]
    # (a tensor of another dtype is cast to the parameter's by torch itself: not an error)
    for bad in (buf.reshape(-1)[:-1].clone(), buf[:1].clone(), "a string", [0.5, 0.5]):
        edited = load_checkpoint(run / "checkpoint.safetensors")
        edited["optimizer"]["state"][key]["momentum_buffer"] = bad
        save_checkpoint(run / "checkpoint.safetensors", edited)
        line = one_line(*vp(capsys, "train", "--resume", run)[::2])
        assert "optimizer state" in line
    save_checkpoint(run / "checkpoint.safetensors", good)
    assert vp(capsys, "train", "--resume", run)[0] == 0


@pytest.mark.parametrize("broken", ["torch", "numpy", "safetensors"])
def test_doctor_reports_a_broken_import_and_exits_0(tmp_path, broken):
    (tmp_path / broken).mkdir()
    (tmp_path / broken / "__init__.py").write_text(f"raise ImportError('{broken} is broken for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), SRC]))
    r = subprocess.run(
        [sys.executable, "-m", "varprune", "doctor"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert f"import {broken}: FAILS" in r.stdout and f"{broken} is broken for this test" in r.stdout


# ----------------------------------------------------------------- 12: bad paths, batches of one


def test_bad_out_and_plot_paths_are_exit_2_before_any_work(capsys, run, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    long = tmp_path / ("y" * 300)
    for cmd in (["study", "--methods", "sgd", *TINY], ["demo", "--size", "tiny"]):
        for out, expected in ((afile, "not a folder"), (long, "longer than the file system allows")):
            line = one_line(*vp(capsys, *cmd, "--out", out)[::2])
            assert expected in line
    assert "longer than" in one_line(*vp(capsys, "train", *TINY, "--out", long)[::2])
    assert afile.read_text() == "mine"

    before = snapshot(run)
    for plot, expected in ((tmp_path, "is a folder"), (tmp_path / "notes.md", "does not end in .png")):
        line = one_line(*vp(capsys, "prune", run, "--force", *SWEEP, "--plot", plot)[::2])
        assert expected in line
    assert snapshot(run) == before  # refused before the sweep
    line = one_line(*vp(capsys, "train", *TINY, "--limit-train", "1", "--out", tmp_path / "x")[::2])
    assert "--limit-train must be in [2" in line


# ----------------------------------------------------------------- 13: signals, full disks, determinism


def test_sigterm_keeps_completed_epochs_and_resume_takes_device_and_data_dir(capsys, tmp_path, fmnist_dir):
    data = data_copy(fmnist_dir, tmp_path / "data")
    run = tmp_path / "run"
    epochs = 20  # one step each: seconds in all
    proc = spawn(
        "train",
        "--model",
        "mlp",
        "--epochs",
        epochs,
        "--limit-train",
        "64",
        "--limit-test",
        "64",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--quiet",
        "--data-dir",
        data,
        "--out",
        run,
    )
    try:
        # an epoch is complete once its metrics line is written: the loop writes the checkpoint first, then the
        # metrics (atomically; the file exists, empty, from the start), so waiting on the checkpoint alone raced a
        # SIGTERM between the two (seen under load: 0 metrics lines)
        metrics = run / "metrics.jsonl"
        wait_for(lambda: (run / "checkpoint.safetensors").exists() and metrics.exists() and metrics.read_text(), proc)
        line = one_line(*vp(capsys, "prune", run)[::2])  # while it trains
        assert "still training" in line and "wait" in line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert "terminated (SIGTERM)" in last and "completed epochs are kept" in last and "--resume" in last
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert 1 <= done < epochs and not (run / "model.safetensors").exists()

    moved = data.rename(tmp_path / "data-moved")  # the data now lives elsewhere
    line = one_line(*vp(capsys, "train", "--resume", run)[::2])
    assert "not found" in line and str(data) in line
    if not torch.cuda.is_available():  # --device reaches the configuration
        line = one_line(*vp(capsys, "train", "--resume", run, "--device", "cuda")[::2])
        assert "cuda" in line
    rc, out, err = vp(capsys, "train", "--resume", run, "--device", "cpu", "--data-dir", moved)
    assert rc == 0, err
    assert f"after epoch {done}/{epochs}" in out
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert (run / "model.safetensors").is_file()


def test_ctrl_c_during_prune_keeps_finished_runs(capsys, trained, tmp_path, monkeypatch):
    runs = [Path(shutil.copytree(trained, tmp_path / name, symlinks=True)) for name in ("a", "b")]
    for r in runs:
        for f in ("prune.json", "prune.csv", "prune.png"):
            (r / f).unlink()
    import varprune.engine.sweep as sweep

    real, calls = sweep.prune_sweep, []

    def ctrl_c_in_the_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sweep, "prune_sweep", ctrl_c_in_the_second)
    plot = tmp_path / "both.png"
    rc, _, err = vp(capsys, "prune", *runs, *SWEEP, "--plot", plot)
    assert rc == 130 and "interrupted" in err and "runs whose prune.json was written are kept" in err
    assert (runs[0] / "prune.json").is_file() and not (runs[1] / "prune.json").exists()
    monkeypatch.setattr(sweep, "prune_sweep", real)
    rc, out, err = vp(capsys, "prune", *runs, *SWEEP, "--plot", plot)
    assert rc == 0, err
    assert f"reusing {runs[0] / 'prune.json'}" in out and f"pruning {runs[1]}" in out


def test_full_disk_names_the_file_and_keeps_the_old_one(capsys, run, monkeypatch):
    old = (run / "prune.json").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    rc, _, err = vp(capsys, "prune", run, "--force", "--sparsities", "0.5", "--bnt-batches", "0")
    monkeypatch.undo()
    line = one_line(rc, err, code=1)
    assert "No space left on device" in line and line.endswith(str(run / "prune.json"))
    assert (run / "prune.json").read_bytes() == old
    assert not list(run.glob(".*.tmp"))


def test_two_identical_runs_write_identical_weights(capsys, trained, tmp_path, fmnist_dir):
    rc, _, err = vp(capsys, "train", *TINY, "--data-dir", fmnist_dir, "--out", tmp_path / "again")
    assert rc == 0, err
    again = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert again == (trained / "model.safetensors").read_bytes()
    from safetensors.torch import load as st_load  # still plain safetensors, readable by the library

    from varprune.models import create_model

    assert set(st_load(again)) == set(create_model("mlp", 1, 10, 28).state_dict())
