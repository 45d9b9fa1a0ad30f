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
