"""Issue 19, section 1: every file or folder a user names as an output follows one rule (storage/files.py).

Never a run folder's file, never a file varprune did not write without --overwrite, never anything that is not
a regular file; a missing folder is exit 2 with the fix; refusals come before any work and touch nothing.
"""

import os
import shutil
import stat

import pytest

from helpers import SWEEP, TINY, cli, one_line_error, snapshot, train_tiny


@pytest.fixture(scope="module")
def shared(tmp_path_factory, fmnist_dir):
    root = tmp_path_factory.mktemp("outputs")
    return train_tiny(root / "a", fmnist_dir), train_tiny(root / "b", fmnist_dir, "--seed", "1")


@pytest.fixture
def runs(shared, tmp_path):
    a, b = (shutil.copytree(r, tmp_path / r.name, symlinks=True) for r in shared)
    return a, b


EXPORT = ["--sparsity", "0.5", "--bnt-batches", "2", "--bnt-batch-size", "64"]


@pytest.mark.parametrize(
    "name",
    ["model.safetensors", "config.json", "checkpoint.safetensors", "metrics.jsonl", "prune.json", "notes-of-mine.txt"],
)
def test_export_never_replaces_a_file_of_any_run(capsys, runs, name):
    a, b = runs
    (b / "notes-of-mine.txt").write_text("user's")
    before = snapshot(a), snapshot(b)
    for target in (a / name, b / name) if name != "notes-of-mine.txt" else (b / name,):
        for extra in ([], ["--overwrite"]):
            line = one_line_error(*cli(capsys, "export", a, *EXPORT, "--out", target, *extra)[::2])
            assert "run" in line and str(target) in line, line
    assert (snapshot(a), snapshot(b)) == before


def test_export_replaces_a_user_file_only_with_overwrite_and_its_own_file_always(capsys, runs, tmp_path):
    a, _ = runs
    mine = tmp_path / "mynotes.txt"
    mine.write_text("user's")
    line = one_line_error(*cli(capsys, "export", a, *EXPORT, "--out", mine)[::2])
    assert "not written by varprune" in line and "--overwrite" in line
    assert mine.read_text() == "user's"
    rc, _, err = cli(capsys, "export", a, *EXPORT, "--out", mine, "--overwrite")
    assert rc == 0, err
    rc, _, err = cli(capsys, "export", a, "--sparsity", "0.9", "--bnt-batches", "0", "--out", mine)
    assert rc == 0, err  # now it is varprune's own file: replaced without --overwrite


def test_nothing_but_a_regular_file_is_ever_renamed_over(capsys, runs, tmp_path):
    a, b = runs
    fifo = tmp_path / "fake.png"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "elsewhere.png")
    # (a FIFO stands for /dev/null and other devices: a test that fails must not replace a real device node)
    cases = [
        ("export", a, *EXPORT, "--out", fifo),
        ("export", a, *EXPORT, "--out", fifo, "--overwrite"),
        ("export", a, *EXPORT, "--out", folder),
        ("report", a, "--plot", fifo, "--overwrite"),
        ("report", a, "--plot", link),
        ("prune", a, b, *SWEEP, "--plot", fifo),
    ]
    for args in cases:
        line = one_line_error(*cli(capsys, *args)[::2])
        assert "never replaces" in line, line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir() and os.path.islink(link)


def test_report_outputs_follow_the_rule(capsys, runs, tmp_path):
    a, b = runs
    mine = tmp_path / "fig.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\nuser's")
    page = tmp_path / "page.html"
    page.write_text("<html>user's</html>")
    for args in (("--plot", mine), ("--html", page)):
        line = one_line_error(*cli(capsys, "report", a, b, *args)[::2])
        assert "not written by varprune" in line
    assert mine.read_bytes().endswith(b"user's") and page.read_text() == "<html>user's</html>"
    rc, _, err = cli(capsys, "report", a, b, "--plot", mine, "--html", page, "--overwrite")
    assert rc == 0, err
    rc, _, err = cli(capsys, "report", a, b, "--plot", mine, "--html", page)  # varprune's own now
    assert rc == 0, err
    for flag, name in (("--plot", "x.png"), ("--html", "x.html")):  # a missing folder: exit 2 with the fix
        line = one_line_error(*cli(capsys, "report", a, flag, tmp_path / "missing" / name)[::2])
        assert "does not exist" in line


def test_report_never_modifies_its_inputs(capsys, runs):
    a, _ = runs
    (a / ".replaced-run").mkdir()
    (a / ".replaced-run" / "config.json").write_text("{}")
    before = snapshot(a)
    rc, out, err = cli(capsys, "report", a)
    assert rc == 0 and "| " in out, err
    assert snapshot(a) == before


def test_report_analysis_must_be_an_analysis_folder(capsys, runs, tmp_path):
    a, _ = runs
    for folder in (tmp_path / "nonexistent", a):
        line = one_line_error(*cli(capsys, "report", a, "--html", tmp_path / "o.html", "--analysis", folder)[::2])
        assert "analyze" in line
    assert not (tmp_path / "o.html").exists()


@pytest.mark.parametrize("command", ["study", "tune", "analyze"])
def test_output_folders_keep_a_users_files(capsys, runs, tmp_path, fmnist_dir, command):
    a, _ = runs
    out = tmp_path / "out"
    out.mkdir()
    name = {"study": "report.md", "tune": "tune.json", "analyze": "histograms.png"}[command]
    (out / name).write_bytes(b"user's")
    args = {
        "study": ["study", "--out", out, *TINY, "--data-dir", fmnist_dir, "--methods", "sgd", "--no-analysis", *SWEEP],
        "tune": [
            "tune",
            "--out",
            out,
            *TINY,
            "--data-dir",
            fmnist_dir,
            "--sparsity",
            "0.5",
            "--grid",
            "1",
            "--baseline",
            "none",
            "--bnt-batches",
            "2",
            "--bnt-batch-size",
            "64",
        ],
        "analyze": ["analyze", a, "--out", out, "--hessian-iters", "1", "--no-sensitivity"],
    }[command]
    line = one_line_error(*cli(capsys, *args)[::2])
    assert "not written by varprune" in line and "--overwrite" in line
    assert snapshot(out) == {name: b"user's"}
