"""Issue 19, section 5: numbers that should not be trusted are refused (non-finite weights, results out of
range, results of other weights, results measured on other data)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load as st_load

from helpers import SWEEP, cli, one_line_error, train_tiny
from varprune.storage.checkpoint import serialize_safetensors
from varprune.storage.pruned_format import load_pruned, read_pruned_metadata, save_pruned


@pytest.fixture(scope="module")
def shared(tmp_path_factory, fmnist_dir):
    root = tmp_path_factory.mktemp("trust")
    run = train_tiny(root / "run", fmnist_dir)
    assert (
        cli_main(
            "export",
            run,
            "--sparsity",
            "0.5",
            "--bnt-batches",
            "2",
            "--bnt-batch-size",
            "64",
            "--out",
            root / "p.safetensors",
        )
        == 0
    )
    return run, root / "p.safetensors"


def cli_main(*args):
    from varprune.cli import main

    return main([str(a) for a in args])


@pytest.fixture
def run(shared, tmp_path):
    return shutil.copytree(shared[0], tmp_path / "run", symlinks=True)


def rewrite_weights(path, change):
    """Change the tensors of a safetensors file and write it again with a valid checksum."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "sha256"}
    state = st_load(raw)
    change(state)
    path.write_bytes(serialize_safetensors(state, meta))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_a_run_with_non_finite_weights_is_refused(capsys, run, tmp_path, value):
    def poison(state):
        state["1.weight"][0, 0] = value

    rewrite_weights(run / "model.safetensors", poison)
    for args in (("prune", run, *SWEEP, "--force"), ("export", run, "--sparsity", "0.5", "--out", tmp_path / "x.st")):
        line = one_line_error(*cli(capsys, *args)[::2])
        assert "non-finite" in line and "1.weight" in line, line
    assert not (tmp_path / "x.st").exists()


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_an_exported_file_with_non_finite_values_is_refused(capsys, shared, tmp_path, value):
    meta = read_pruned_metadata(shared[1])
    model = load_pruned(shared[1])
    masks = {n: p != 0 for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}
    with torch.no_grad():
        w = dict(model.named_parameters())["1.weight"]
        w[masks["1.weight"]] = value  # every kept value
    keep = {
        k: v
        for k, v in meta.items()
        if k not in ("format", "format_version", "layout", "values_dtype", "realised_sparsity", "sha256")
    }
    bad = tmp_path / "bad.safetensors"
    save_pruned(bad, model, masks, keep)
    line = one_line_error(*cli(capsys, "evaluate", bad)[::2])
    assert "non-finite" in line


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("sparsity", 5.0, "sparsity is 5.0"),
        ("accuracy", 1e308, "accuracy is 1e+308"),
        ("dense_accuracy", -1, "dense_accuracy is -1"),
    ],
)
def test_report_refuses_results_out_of_range(capsys, run, field, value, words):
    doc = json.loads((run / "prune.json").read_text())
    if field.startswith("dense"):
        doc[field] = value
    else:
        doc["results"][0][field] = value
    (run / "prune.json").write_text(json.dumps(doc))
    line = one_line_error(*cli(capsys, "report", run)[::2])
    assert str(run / "prune.json") in line and words in line, line


def test_report_says_a_prune_json_of_other_weights_is_stale(capsys, run):
    rewrite_weights(run / "model.safetensors", lambda s: s["1.weight"].mul_(0.5))
    line = one_line_error(*cli(capsys, "report", run)[::2])
    assert "other weights" in line and "--allow-stale" in line
    rc, out, err = cli(capsys, "report", run, "--allow-stale")
    assert rc == 0 and "| " in out, err


def test_a_sweep_on_other_data_is_not_reused(capsys, run, tmp_path, fmnist_dir):
    other = tmp_path / "other"
    other.mkdir()
    for f in fmnist_dir.iterdir():  # the same files, another folder: another measurement
        if "ubyte" in f.name:
            (other / f.name).symlink_to(f.resolve())
    rc, out, err = cli(capsys, "prune", run, *SWEEP)
    assert rc == 0 and "reusing" in out, err
    rc, out, err = cli(capsys, "prune", run, *SWEEP, "--data-dir", other)
    assert rc == 0 and "reusing" not in out, err
    assert json.loads((run / "prune.json").read_text())["data"]["dir"] == str(other.resolve())
