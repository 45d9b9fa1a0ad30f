"""The command line end to end on a Fashion-MNIST subset, and its handling of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
PNG = b"\x89PNG\r\n\x1a\n"


def varprune(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "varprune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


QUICK = [
    "--model",
    "resnet20",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--limit-train",
    "512",
    "--limit-test",
    "500",
    "--device",
    "cpu",
    "--quiet",
]


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, fmnist_dir):
    root = tmp_path_factory.mktemp("runs")
    for method in ("sgd", "var"):
        var = ["--var-lambda", "1e-5"] if method == "var" else []
        r = varprune("train", "--method", method, *var, *QUICK, "--out", root / method)
        assert r.returncode == 0, r.stderr
    return root


def test_train_writes_the_run_folder(trained_runs):
    run = trained_runs / "var"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["method"] == "var" and cfg["train"]["var_lambda"] == 1e-5
    assert cfg["resolved"]["train_examples"] == 512 and cfg["resolved"]["device"] == "cpu"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    keys = {"loss", "cross_entropy", "var_term", "train_accuracy", "test_accuracy", "mean_layer_variance"}
    assert keys <= set(lines[0])
    assert lines[0]["var_term"] > 0 and lines[0]["loss"] == pytest.approx(
        lines[0]["cross_entropy"] + lines[0]["var_term"]
    )
    assert (run / "model.safetensors").read_bytes()[8:9] == b"{"


def test_prune_writes_json_csv_table_and_plot(trained_runs, tmp_path):
    runs = [trained_runs / "sgd", trained_runs / "var"]
    before = {p: p.read_bytes() for r in runs for p in (r / "model.safetensors", r / "checkpoint.safetensors")}
    r = varprune(
        "prune",
        *runs,
        "--sparsities",
        "0.5,0.9,0.95",
        "--bnt-batches",
        "2",
        "--bnt-batch-size",
        "100",
        "--plot",
        tmp_path / "both.png",
    )
    assert r.returncode == 0, r.stderr
    assert "| sgd |" in r.stdout and "| var λ=1e-05 |" in r.stdout and "95%" in r.stdout
    for run in runs:
        doc = json.loads((run / "prune.json").read_text())
        assert 0 <= doc["dense_accuracy"] <= 1
        assert [x["sparsity"] for x in doc["results"]] == [0.5, 0.9, 0.95]
        for x in doc["results"]:
            assert set(x) == {"pruner", "scope", "sparsity", "realised_sparsity", "accuracy", "accuracy_bnt", "prune_s"}
            assert x["scope"] == "global" and x["prune_s"] >= 0  # not a causal LM: CrAM's global scope
            assert x["pruner"] == "magnitude"  # the default
            assert abs(x["realised_sparsity"] - x["sparsity"]) < 1e-5
            assert 0 <= x["accuracy"] <= 1 and 0 <= x["accuracy_bnt"] <= 1
        assert (run / "prune.csv").read_text().startswith("pruner,sparsity,realised_sparsity,accuracy,accuracy_bnt\n")
        assert (run / "prune.png").read_bytes()[:8] == PNG
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG
    assert before == {p: p.read_bytes() for p in before}  # checkpoints are read, never modified
    r = varprune("report", *runs)
    assert r.returncode == 0 and "| sgd |" in r.stdout


def test_existing_run_is_not_overwritten(trained_runs):
    run = trained_runs / "sgd"
    weights = (run / "model.safetensors").read_bytes()
    r = varprune("train", *QUICK, "--out", run)
    assert r.returncode == 2 and "already holds a run" in r.stderr and "--overwrite" in r.stderr
    assert (run / "model.safetensors").read_bytes() == weights


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("varprune: error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "--model", "resnet1000", "--out", "x"], "unknown model 'resnet1000'"),
        (["train", "--dataset", "imagenet", "--out", "x"], "unknown dataset 'imagenet'"),
        (["train", "--method", "adamw", "--out", "x"], "unknown method 'adamw'"),
        (["train", "--var-lambda", "-1", "--out", "x"], "--var-lambda must be in [0, "),
        (
            ["train", "--epochs", "0", "--batch-size", "-3", "--out", "x"],
            "--epochs must be in [1, 100000], got 0; --batch-size",
        ),
        (["train", "--epochs", "two", "--out", "x"], "invalid int value"),
        (["train", "--data-dir", "nowhere", "--out", "x"], "fashion-mnist not found in nowhere"),
        (["prune", "nowhere", "--sparsities", "0.5"], "nowhere is not a varprune run folder"),
        (["prune", "nowhere", "--sparsities", "0.5,1.0"], "sparsities must be in [0, 1)"),
        (["prune", "nowhere", "--sparsities", "0.5,0.5"], "sparsities must be unique"),
        (["report", "nowhere"], "nowhere/prune.json not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, expected):
    line = one_line_error(varprune(*args, cwd=tmp_path))
    assert expected in line
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_unreadable_run_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    assert "cannot read" in one_line_error(varprune("prune", run))
    (run / "config.json").write_text(json.dumps({"train": {"model": "resnet20"}}))
    assert "no model.safetensors" in one_line_error(varprune("prune", run))
    (run / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert "not a readable safetensors file" in one_line_error(varprune("prune", run))


def test_train_help_lists_models_and_methods():
    r = varprune("train", "--help")
    assert r.returncode == 0
    for name in ("resnet18", "resnet20", "resnet56", "vgg16_bn", "vit_tiny", "sgd", "var"):
        assert name in r.stdout


ALL_METHODS = ["sgd", "var", "sam", "asam", "cram", "cram+", "s2sam", "l1", "hoyer", "var+sam", "var+cram+"]


def study(out, methods, seeds):
    return varprune(
        "study",
        "--model",
        "mlp",
        "--methods",
        ",".join(methods),
        "--seeds",
        seeds,
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--limit-train",
        "256",
        "--limit-test",
        "200",
        "--sparsities",
        "0.5,0.9,0.95",
        "--bnt-batches",
        "2",
        "--bnt-batch-size",
        "64",
        "--device",
        "cpu",
        "--quiet",
        "--no-analysis",
        "--out",
        out,
    )  # analysis and the HTML page: tests/test_e2e_artifacts.py


def test_study_of_every_method_fills_every_cell(tmp_path, fmnist_dir):
    out = tmp_path / "study"
    r = study(out, ALL_METHODS, "0")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert list(report["methods"]) == ALL_METHODS
    for m in ALL_METHODS:
        entry = report["methods"][m]
        assert entry["time_vs_sgd"] > 0
        for s in ("0.5", "0.9", "0.95"):
            cell = entry["sparsities"][s]
            assert all(0 <= a <= 1 for a in cell["per_seed_bnt"] + cell["per_seed"])
    table = (out / "report.md").read_text()
    assert all(f"| {m} |" in table for m in ALL_METHODS) and "—" not in table
    assert (out / "report.png").read_bytes()[:8] == PNG


def test_study_averages_seeds_and_reuses_runs(tmp_path, fmnist_dir):
    out = tmp_path / "study"
    r = study(out, ["sgd", "var"], "0,1")
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    for m in ("sgd", "var"):
        for cell in report["methods"][m]["sparsities"].values():
            assert len(cell["per_seed_bnt"]) == 2
            assert cell["accuracy_bnt"][0] == pytest.approx(sum(cell["per_seed_bnt"]) / 2)
            a, b = cell["per_seed_bnt"]
            assert cell["accuracy_bnt"][1] == pytest.approx(abs(a - b) / 2**0.5)
    assert "mean [95% interval] over seeds [0, 1]" in (out / "report.md").read_text()
    assert json.loads((out / "study.json").read_text())["seeds"] == [0, 1]
    weights = {p: p.read_bytes() for p in out.glob("runs/*/model.safetensors")}
    assert len(weights) == 4
    r = study(out, ["sgd", "var"], "0,1")  # a second call reuses every run and sweep
    assert r.returncode == 0 and r.stdout.count("| sgd |") == 2
    assert "training sgd seed" not in r.stdout and f"pruning {out}" not in r.stdout
    assert r.stdout.count("reusing") == 4
    assert weights == {p: p.read_bytes() for p in weights}
    # the runs themselves, grouped by method: the study's intervals, computed from the runs' prune.json files
    r = varprune("report", *sorted(out.glob("runs/*")))
    assert r.returncode == 0, r.stderr
    grouped = r.stdout.split("By method:")[1]
    assert "mean [95% interval] over seeds [0, 1]" in grouped
    row = lambda text: next(line for line in text.splitlines() if line.startswith("| sgd |"))  # noqa: E731
    assert row(grouped).split("|")[2] == row((out / "report.md").read_text()).split("|")[2]  # dense cell
    # runs pruned one by one carry their method as label ("sgd"): the per-run table tells the seeds apart, and
    # the folders where the seeds are the same too
    from varprune.commands.report import _distinct_labels

    sgd = sorted(out.glob("runs/sgd*"))
    assert [n for n, _ in _distinct_labels(sgd, [("sgd", {}), ("sgd", {})])] == ["sgd seed 0", "sgd seed 1"]
    same = _distinct_labels([sgd[0], sgd[0]], [("sgd", {}), ("sgd", {})])
    assert [n for n, _ in same] == [f"sgd ({sgd[0]})"] * 2


def test_demo_tiny_end_to_end(tmp_path, fmnist_dir):
    out = tmp_path / "demo"
    r = varprune("demo", "--size", "tiny", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "| sgd |" in r.stdout and "| var" in r.stdout
    assert (out / "demo.png").read_bytes()[:8] == PNG
    assert "Machine:" in (out / "results.md").read_text()
    # command-level progress: one line per step, with the time so far and, once a step has run, the time left
    steps = [line for line in r.stdout.splitlines() if line.startswith("[demo ")]
    assert [line.split("]")[0] for line in steps] == ["[demo 1/3", "[demo 2/3", "[demo 3/3"], r.stdout
    assert "estimating the time left" in steps[0] and all(" left)" in line for line in steps[1:]), steps
    r = varprune("demo", "--size", "tiny", "--out", out, "--quiet")
    assert r.returncode == 0 and "reusing finished run" in r.stdout
