"""Helpers shared by the end-to-end tests: the CLI in-process, and its one-line errors."""

from varprune.cli import main


def cli(capsys, *args):
    """Run ``varprune ARGS`` in this process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err):
    """Exit 2 with exactly one line on stderr, no traceback; returns the line."""
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("varprune: error: ") and "Traceback" not in err, err
    return lines[0]


# a tiny MLP run on Fashion-MNIST (seconds), and a small sweep of it
TINY = [
    "--model",
    "mlp",
    "--model-arg",
    "width=64",
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


def snapshot(folder):
    """Every file under ``folder`` (but the lock) and its bytes."""
    from pathlib import Path

    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def train_tiny(run, data_dir, *extra):
    """A finished tiny run in ``run`` (and its sweep), through the CLI in this process."""
    assert main(["train", *TINY, *map(str, extra), "--data-dir", str(data_dir), "--out", str(run)]) == 0
    assert main(["prune", str(run), *SWEEP]) == 0
    return run
