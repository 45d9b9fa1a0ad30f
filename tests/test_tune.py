"""`varprune tune` end to end on Fashion-MNIST's training files only (the test files absent)."""

import contextlib
import dataclasses
import gzip
import io
import json
import re
import shlex
from collections import Counter

import numpy as np
import pytest
import torch

from varprune.cli import build_parser, main
from varprune.commands.flags import from_args
from varprune.engine.loop import load_data
from varprune.engine.runconfig import load_run_config
from varprune.engine.tune import default_rounds, schedule

PNG = b"\x89PNG\r\n\x1a\n"
GRID = [0.1, 1.0, 10.0]
TUNE = [
    "tune",
    "--dataset",
    "fashion-mnist",
    "--model",
    "mlp",
    "--limit-train",
    "256",
    "--limit-test",
    "1500",
    "--batch-size",
    "64",
    "--epochs",
    "2",
    "--device",
    "cpu",
    "--quiet",
    "--grid",
    ",".join(map(str, GRID)),
    "--rounds",
    "2",
    "--sparsity",
    "0.9",
    "--bnt-batches",
    "2",
    "--bnt-batch-size",
    "128",
]


def raw_images(folder) -> np.ndarray:
    """The training images straight from the IDX file (an independent reader)."""
    raw = (folder / "train-images-idx3-ubyte").read_bytes()
    n, h, w = (int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(3))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h * w)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, fmnist_dir):
    root = tmp_path_factory.mktemp("tune")
    data = root / "train-only"
    data.mkdir()
    for f in fmnist_dir.glob("train-*.gz"):  # stored uncompressed: every run reads them again
        (data / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    assert len(list(data.iterdir())) == 2 and not list(data.glob("t10k-*"))
    out = root / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*TUNE, "--data-dir", str(data), "--out", str(out)])
    assert code == 0
    return out, data, json.loads((out / "tune.json").read_text()), stdout.getvalue()


def test_tune_writes_json_and_plot_and_follows_its_schedule(tuned):
    out, _, doc, _ = tuned
    assert (out / "tune.png").read_bytes().startswith(PNG)
    assert doc["grid"] == GRID and doc["sparsity"] == 0.9 and doc["search"] == "strength"
    assert [(r["epochs"], len(r["candidates"])) for r in doc["rounds"]] == [(1, 3), (2, 2)]
    # round 2 holds round 1's better half, by round 1's scores
    first = {c["value"]: c["score"] for c in doc["rounds"][0]["candidates"]}
    assert sorted(c["value"] for c in doc["rounds"][1]["candidates"]) == sorted(
        sorted(first, key=lambda v: -first[v])[:2]
    )
    assert doc["baseline"]["method"] == "sgd" and doc["baseline"]["epochs"] == 2
    assert 0 <= doc["baseline"]["score"] <= 1


def test_choice_is_the_argmax_of_the_last_round_by_the_runs_own_sweeps(tuned):
    out, _, doc, _ = tuned
    scores = {}
    for c in doc["rounds"][-1]["candidates"]:
        sweep = json.loads((out / "candidates" / c["name"] / "prune.json").read_text())
        (row,) = sweep["results"]
        assert row["sparsity"] == 0.9
        scores[c["value"]] = row["accuracy_bnt"]
    assert doc["choice"]["value"] == max(scores, key=scores.get)
    assert doc["choice"]["score"] == max(scores.values())
    assert doc["choice"]["var_lambda"] * doc["choice"]["psi_init"] == pytest.approx(doc["choice"]["value"])


def test_validation_is_carved_from_the_training_set_and_disjoint_from_it(tuned):
    out, data, doc, _ = tuned
    raw = raw_images(data)
    rows = {}
    for i, img in enumerate(raw):
        rows.setdefault(img.tobytes(), []).append(i)
    run = out / "candidates" / doc["rounds"][-1]["candidates"][0]["name"]
    cfg = load_run_config(run)
    assert cfg.validation_fraction == 0.1
    loaded = load_data(cfg, torch.device("cpu"))
    train = [x.numpy().reshape(-1).tobytes() for x in loaded.train_loader.images]
    val = [x.numpy().reshape(-1).tobytes() for x in loaded.test_loader.images]
    assert len(train) == 256 and len(val) == 1500 == doc["validation"]["validation_examples"]
    # every example comes from the training file; a validation image never equals a training image
    # (except where the file itself holds that image twice)
    assert all(b in rows for b in train + val)
    shared = set(train) & set(val)
    assert all(len(rows[b]) > 1 for b in shared)
    assert len(shared) <= 2
    # without the limits: the two splits partition the training file (as multisets of images), 10% held out
    whole = load_data(dataclasses.replace(cfg, limit_train=None, limit_test=None), torch.device("cpu"))
    train_all = [x.numpy().reshape(-1).tobytes() for x in whole.train_loader.images]
    val_all = [x.numpy().reshape(-1).tobytes() for x in whole.test_loader.images]
    assert len(val_all) == round(0.1 * len(raw)) and len(train_all) + len(val_all) == len(raw)
    assert Counter(train_all) + Counter(val_all) == Counter(img.tobytes() for img in raw)
    assert all(len(rows[b]) > 1 for b in set(train_all) & set(val_all))
    assert set(train) <= set(train_all) and set(val) <= set(val_all)
    # the candidates' validation accuracy is the model's accuracy on exactly these examples
    from varprune.engine.loop import build_model
    from varprune.storage.checkpoint import load_weights

    model = build_model(cfg, loaded.data.info, torch.device("cpu"))
    load_weights(run / "model.safetensors", model)
    model.eval()
    x = loaded.test_loader.normalize(loaded.test_loader.images)
    with torch.no_grad():
        acc = (model(x).argmax(1) == loaded.test_loader.labels).double().mean().item()
    dense = next(c for c in doc["rounds"][-1]["candidates"] if c["name"] == run.name)["dense"]
    assert acc == pytest.approx(dense, abs=1e-9)


def test_printed_command_parses_into_the_chosen_configuration(tuned):
    _out, _data, doc, stdout = tuned
    line = [ln.strip() for ln in stdout.splitlines() if ln.strip().startswith("varprune train")][-1]
    assert line == doc["command"]
    words = shlex.split(line)
    cfg = from_args(build_parser().parse_args(words[1:]))
    chosen = load_run_config(doc["choice"]["run"])
    assert chosen.epochs == 2 and cfg.var_strength == doc["choice"]["value"]
    chosen.validation_fraction = None  # the real run measures on the test set
    assert cfg == chosen


def test_second_call_reuses_everything(tuned, capsys):
    out, data, doc, _ = tuned
    assert main([*TUNE, "--data-dir", str(data), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert not re.search(r"epoch +\d+/\d+", log) and log.count("reusing finished run") == 6
    assert json.loads((out / "tune.json").read_text())["choice"] == doc["choice"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (["--sparsity", None], "needs --sparsity"),
        (["--grid", "0.1,0,1"], "--grid needs positive"),
        (["--grid", "0.1,-1"], "--grid needs positive"),
        (["--grid", "1,1"], "unique"),
        (["--rounds", "9"], "--rounds must be in [1, 3]"),
        (["--method", "sgd"], "--method must use VAR"),
        (["--var-lambda", "1e-4"], "drop --var-lambda"),
        (["--validation-fraction", "0.9"], "--validation-fraction must be in"),
        (["--baseline", "adam"], "--baseline 'adam' is not a method"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(change, expected, tmp_path, capsys, fmnist_dir):
    args = list(TUNE)
    if change[1] is None:
        i = args.index(change[0])
        del args[i : i + 2]
    elif change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += change
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err
    assert not out.exists()


def test_schedule_halves_candidates_and_doubles_epochs():
    assert default_rounds(6) == 3 and default_rounds(3) == 2 and default_rounds(2) == 1
    assert schedule(6, 15, 3) == [(6, 4), (3, 8), (2, 15)]
    assert schedule(3, 1, 2) == [(3, 1), (2, 1)]
    for n in range(1, 12):
        plan = schedule(n, 10, default_rounds(n))
        assert plan[0][0] == n and plan[-1] == (min(n, 2), 10)
