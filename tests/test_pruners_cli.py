"""Wanda and SparseGPT through the command line on image runs (a BatchNorm MLP on Fashion-MNIST): the sweep, a
study of method x pruner with the cross comparison, and export, whose file must evaluate to the sweep's number."""

from __future__ import annotations

import json

import pytest
from tests.helpers import TINY, cli, one_line_error

pytestmark = pytest.mark.slow

GRID = ["--sparsities", "0.5,0.9", "--patterns", "2:4", "--bnt-batches", "2", "--bnt-batch-size", "64"]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, fmnist_dir):
    from varprune.cli import main

    run = tmp_path_factory.mktemp("img") / "run"
    assert main(["train", *TINY, "--data-dir", str(fmnist_dir), "--out", str(run)]) == 0
    return run


def test_every_pruner_sweeps_an_image_run_with_bn_retuning(image_run, capsys):
    rc, out, err = cli(capsys, "prune", image_run, *GRID, "--pruners", "magnitude,wanda,sparsegpt",
                       "--calib-samples", "64")  # fmt: skip
    assert rc == 0, err
    doc = json.loads((image_run / "prune.json").read_text())
    assert doc["pruners"] == ["magnitude", "wanda", "sparsegpt"] and doc["bn_retuning"] is True
    assert doc["calibration"] == {"samples": 64, "seq_len": None}
    rows = {(r["pruner"], r.get("pattern", r["sparsity"])): r for r in doc["results"]}
    assert set(rows) == {(p, s) for p in ("magnitude", "wanda", "sparsegpt") for s in (0.5, 0.9, "2:4")}
    for (pruner, setting), r in rows.items():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["accuracy_bnt"] <= 1
        target = 0.5 if setting == "2:4" else setting
        # the calibrated pruners prune every tensor to the fraction (per row): the overall realised sparsity is it
        assert r["realised_sparsity"] == pytest.approx(target, abs=0.01), (pruner, setting)
    assert "| wanda |" in out and "| sparsegpt |" in out
    assert (image_run / "prune.csv").read_text().count("sparsegpt,") == 3


def test_export_with_a_calibrated_pruner_evaluates_to_the_sweeps_number(image_run, capsys, tmp_path):
    rc, _, err = cli(capsys, "prune", image_run, *GRID, "--pruners", "magnitude,wanda", "--calib-samples", "64")
    assert rc == 0, err
    doc = json.loads((image_run / "prune.json").read_text())
    want = next(
        r for r in doc["results"] if r["pruner"] == "wanda" and r.get("pattern") is None and r["sparsity"] == 0.9
    )
    out = tmp_path / "wanda90.safetensors"
    rc, _, err = cli(capsys, "export", image_run, "--sparsity", "0.9", "--pruner", "wanda", "--calib-samples", "64",
                     "--bnt-batches", "2", "--bnt-batch-size", "64", "--out", out)  # fmt: skip
    assert rc == 0, err
    rc, text, err = cli(capsys, "evaluate", out, "--json")
    assert rc == 0, err
    assert json.loads(text.splitlines()[-1])["accuracy"] == pytest.approx(want["accuracy_bnt"], abs=1e-9)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--pruners", "wanda", "--calib-data", "c.txt"], "image and classification runs calibrate on their training"),
        (["--pruners", "wanda", "--calib-samples", "1000000"], "--calib-samples 1000000 is more than"),
        (["--pruners", "wanda,wanda"], "must not repeat"),
    ],
)
def test_bad_pruner_input_on_an_image_run_is_one_line(image_run, capsys, tmp_path, args, expected):
    (tmp_path / "c.txt").write_text("some calibration text " * 50)
    before = (image_run / "prune.json").read_bytes() if (image_run / "prune.json").exists() else None
    rc, _, err = cli(capsys, "prune", image_run, "--sparsities", "0.5", *args)
    assert expected in one_line_error(rc, err)
    assert before == ((image_run / "prune.json").read_bytes() if (image_run / "prune.json").exists() else None)


def test_calibration_that_cannot_fit_is_refused_before_anything_is_drawn(image_run, capsys, monkeypatch):
    """--calib-samples is bounded by memory, not only by the training split: with 1 MiB free, 1000 images of
    28 x 28 (3 MB as float32) are refused naming the flag, and nothing is written."""
    import varprune.engine.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)
    before = (image_run / "prune.json").read_bytes() if (image_run / "prune.json").exists() else None
    rc, _, err = cli(
        capsys, "prune", image_run, "--sparsities", "0.5", "--pruners", "sparsegpt", "--calib-samples", "1000"
    )
    line = one_line_error(rc, err)
    assert "calibrating on 1000 inputs needs about 3 MiB" in line and "lower --calib-samples" in line
    assert before == ((image_run / "prune.json").read_bytes() if (image_run / "prune.json").exists() else None)


def test_study_of_method_by_pruner_states_the_cross_comparison(capsys, tmp_path, fmnist_dir):
    out = tmp_path / "study"
    rc, _, err = cli(
        capsys, "study", "--out", out, *[a for a in TINY if a != "--quiet"], "--data-dir", fmnist_dir,
        "--methods", "sgd,var", "--seeds", "0,1", "--pruners", "magnitude,sparsegpt", "--calib-samples", "32",
        "--sparsities", "0.5,0.9", "--bnt-batches", "2", "--bnt-batch-size", "64", "--no-analysis",
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    cells = report["methods"]["var"]["sparsities"]
    assert set(cells) == {"0.5", "0.9", "sparsegpt:0.5", "sparsegpt:0.9"}
    assert cells["sparsegpt:0.9"]["pruner"] == "sparsegpt" and len(cells["sparsegpt:0.9"]["per_seed_bnt"]) == 2
    # the cross comparison: var + magnitude against sgd + sparsegpt, seed by seed
    cross = {c["setting"]: c for c in report["cross"]}
    assert set(cross) == {0.5, 0.9} and all(c["against_pruner"] == "sparsegpt" for c in cross.values())
    runs = out / "runs"
    for s in (0.5, 0.9):
        ours, theirs = [], []
        for seed in (0, 1):
            var = json.loads((runs / f"var-s{seed}" / "prune.json").read_text())["results"]
            sgd = json.loads((runs / f"sgd-s{seed}" / "prune.json").read_text())["results"]
            ours.append(next(r["accuracy_bnt"] for r in var if r["pruner"] == "magnitude" and r["sparsity"] == s))
            theirs.append(next(r["accuracy_bnt"] for r in sgd if r["pruner"] == "sparsegpt" and r["sparsity"] == s))
        assert cross[s]["diff"] == pytest.approx(sum(a - b for a, b in zip(ours, theirs)) / 2)
    md = (out / "report.md").read_text()
    assert "| method | pruner | dense |" in md
    assert "var + magnitude vs sgd + sparsegpt at 90%" in md and "var + magnitude vs sgd + sparsegpt at 50%" in md
