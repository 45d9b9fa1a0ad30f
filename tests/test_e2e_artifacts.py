"""What runs leave behind, end to end: analysis and HTML (issue 13), export / evaluate / finetune (issue 15).

Commands run in-process through ``varprune.cli.main`` on a Fashion-MNIST
subset, except the kill-and-resume test, which needs a real process to kill.
"""

import base64
import io
import json
import os
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
from safetensors.torch import load_file

Image = pytest.importorskip("PIL.Image")

import varprune  # noqa: E402
from helpers import cli, one_line_error  # noqa: E402
from varprune.cli import main  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
QUICK = [
    "--model",
    "mlp",
    "--epochs",
    "2",
    "--limit-train",
    "128",
    "--limit-test",
    "64",
    "--batch-size",
    "32",
    "--device",
    "cpu",
    "--quiet",
]
BNT = ["--bnt-batches", "2", "--bnt-batch-size", "32"]
SPARS = ["--sparsities", "0.5,0.95", *BNT, "--device", "cpu"]


def valid_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist_dir):
    """Two finished, swept runs (SGD and VAR)."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("sgd", "var"):
        var = ["--var-lambda", "1e-4"] if method == "var" else []
        assert main(["train", "--method", method, *var, *QUICK, "--out", str(root / method)]) == 0
        assert main(["prune", str(root / method), *SPARS]) == 0
    return root


# ------------------------------------------------------------ issue 13: analysis and HTML


def test_metrics_have_layer_variance_per_epoch(runs):
    lines = [json.loads(x) for x in (runs / "var" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    weights = load_file(str(runs / "var" / "model.safetensors"))
    prunable = {k for k, v in weights.items() if k.endswith("weight") and v.dim() == 2}
    for m in lines:
        assert set(m["layer_variance"]) == prunable
    # the last epoch's values are those of the final weights: population variance of sqrt(w^2 + r), float64
    r = json.loads((runs / "var" / "config.json").read_text())["train"]["var_r"]
    for k in prunable:
        a = np.sqrt(weights[k].double().numpy() ** 2 + r)
        assert abs(lines[-1]["layer_variance"][k] - a.var()) <= 1e-6 * a.var(), k
    assert lines[0]["layer_variance"] != lines[1]["layer_variance"]


@pytest.fixture(scope="module")
def analysis(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "A"
    assert (
        main(
            [
                "analyze",
                str(runs / "sgd"),
                str(runs / "var"),
                "--out",
                str(out),
                "--hessian-iters",
                "3",
                *BNT,
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out


def test_analyze_writes_json_and_figures(analysis, runs):
    doc = json.loads((analysis / "analysis.json").read_text())
    assert len(doc["runs"]) == 2
    weights = load_file(str(runs / "sgd" / "model.safetensors"))
    prunable = {k for k, v in weights.items() if k.endswith("weight") and v.dim() == 2}
    for _label, entry in doc["runs"].items():
        assert set(entry["layer_variance"]) == prunable
        assert set(entry["layer_sensitivity"]) == prunable
        assert all(np.isfinite(v) for v in entry["layer_sensitivity"].values())
        assert isinstance(entry["hessian_top_eigenvalue"], float) and np.isfinite(entry["hessian_top_eigenvalue"])
        assert {"layer_variance", "layer_sparsity", "sensitivity"} <= set(entry["figures"])
        for name in entry["figures"].values():
            w, h = valid_png(analysis / name)
            assert w > 100 and h > 100
    for name in doc["figures"].values():
        valid_png(analysis / name)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def check_page(page: Path, tmp_path: Path) -> list[bytes]:
    """Every embedded image decodes; the page renders in headless Chromium (if present). Returns the PNGs."""
    text = page.read_text()
    pngs = [base64.b64decode(m) for m in DATA_URI.findall(text)]
    assert pngs, "no embedded images"
    for data in pngs:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    assert not re.search(r'<img[^>]+src="(?!data:)', text), "an image is not embedded"
    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium): rendering not checked")
    shot = tmp_path / f"{page.stem}.png"
    r = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), r.stderr[-2000:]
    for line in r.stderr.splitlines():
        assert "net::ERR" not in line and "Failed to load resource" not in line and ":CONSOLE" not in line, line
    with Image.open(shot) as im:
        lo, hi = im.convert("L").getextrema()
        assert im.size == (1200, 1600) and hi - lo > 100
    return pngs


def test_report_html_with_analysis(runs, analysis, tmp_path, capsys):
    page = tmp_path / "r.html"
    rc, _out, err = cli(capsys, "report", runs / "sgd", runs / "var", "--html", page, "--analysis", analysis)
    assert rc == 0, err
    pngs = check_page(page, tmp_path)
    doc = json.loads((analysis / "analysis.json").read_text())
    figures = list(doc["figures"].values()) + [n for e in doc["runs"].values() for n in e["figures"].values()]
    for name in figures:  # the analysis figures are in the page, byte for byte
        assert (analysis / name).read_bytes() in pngs, name


def test_study_writes_report_html_with_analysis(tmp_path, capsys, fmnist_dir):
    out = tmp_path / "S"
    rc, _, err = cli(
        capsys,
        "study",
        "--methods",
        "sgd,var,sam",
        "--seeds",
        "0",
        *QUICK,
        "--epochs",
        "1",
        "--sparsities",
        "0.5,0.9",
        *BNT,
        "--out",
        out,
    )
    assert rc == 0, err
    pngs = check_page(out / "report.html", tmp_path)
    doc = json.loads((out / "analysis" / "analysis.json").read_text())
    assert len(doc["runs"]) == 3
    figures = list(doc["figures"].values()) + [n for e in doc["runs"].values() for n in e["figures"].values()]
    for name in figures:
        assert (out / "analysis" / name).read_bytes() in pngs, name
    assert (out / "report.png").read_bytes() in pngs


# ------------------------------------------------------------ issue 15: export, evaluate, finetune


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    for values in ("fp32", "fp16"):
        assert (
            main(
                [
                    "export",
                    str(runs / "var"),
                    "--sparsity",
                    "0.95",
                    "--out",
                    str(folder / f"{values}.safetensors"),
                    "--values",
                    values,
                    *BNT,
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    return folder


def test_evaluate_prints_the_sweeps_number(runs, exported, capsys):
    rc, out, err = cli(capsys, "evaluate", exported / "fp32.safetensors", "--json", "--device", "cpu")
    assert rc == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    sweep = json.loads((runs / "var" / "prune.json").read_text())
    want = next(r for r in sweep["results"] if r["sparsity"] == 0.95)["accuracy_bnt"]
    assert got["metric"] == "accuracy" and got["accuracy"] == want  # bit-equal, not close
    assert out.splitlines()[0] == f"accuracy: {100 * want:.2f}%"


def _sweep_weights(run: Path, sparsity: float):
    """The sweep's pruned weights, rebuilt independently of export: model.safetensors + MagnitudePruner."""
    cfg = json.loads((run / "config.json").read_text())
    model = varprune.create_model(cfg["train"]["model"], 1, 10, 28)
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    masks = varprune.MagnitudePruner(model).apply(sparsity)
    return model, masks


def test_load_pruned_weights_equal_the_sweeps(runs, exported):
    model, masks = _sweep_weights(runs / "var", 0.95)
    want = dict(model.named_parameters())
    got = dict(varprune.load_pruned(exported / "fp32.safetensors").named_parameters())
    assert set(masks) <= set(got)
    for name, mask in masks.items():
        g, w = got[name].detach(), want[name].detach()
        assert torch.equal(g != 0, mask), name  # the same mask
        assert torch.equal(g[mask].view(torch.int32), w[mask].view(torch.int32)), name  # kept: bit for bit
        assert torch.equal(g.view(torch.int32), w.view(torch.int32)), name  # every bit, pruned +0.0 included
    for name in got:  # not pruned (biases, BN affine): as trained
        if name not in masks:
            assert torch.equal(got[name].detach(), want[name].detach()), name
    g16 = dict(varprune.load_pruned(exported / "fp16.safetensors").named_parameters())
    for name in masks:
        w = want[name].detach()
        assert torch.equal(g16[name].detach(), w.half().float()), name  # fp16 rounding of each kept value
    assert (exported / "fp16.safetensors").stat().st_size < 0.75 * (exported / "fp32.safetensors").stat().st_size


@pytest.mark.parametrize("damage", ["truncated", "flipped", "foreign", "empty"])
def test_evaluate_refuses_damaged_files(exported, tmp_path, capsys, damage):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    raw = (exported / "fp32.safetensors").read_bytes()
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped":
        b = bytearray(raw)
        b[-100] ^= 0xFF
        bad.write_bytes(bytes(b))
    elif damage == "foreign":
        save_file({"w": torch.zeros(3)}, str(bad))
    else:
        bad.write_bytes(b"")
    rc, _, err = cli(capsys, "evaluate", bad, "--device", "cpu")
    assert str(bad) in one_line_error(rc, err)


def _check_mask_kept(run: Path, masks: dict):
    """Every pruned weight exactly zero in model.safetensors and in the checkpoint's weights and momentum."""
    from varprune.storage.checkpoint import load_checkpoint

    weights = load_file(str(run / "model.safetensors"))
    state = load_checkpoint(run / "checkpoint.safetensors")
    opt = state["optimizer"]
    assert opt["param_groups"][0]["momentum"] == 0.9 and opt["param_groups"][0]["weight_decay"] > 0
    moved = 0
    for name, keep in masks.items():
        assert torch.all(weights[name][~keep] == 0), name
        assert torch.all(state["model"][name][~keep] == 0), name
        moved += int((weights[name][keep] != 0).sum())
    assert moved > 0
    # momentum buffers: indexed by parameter order in the optimizer state
    order = [n for n, _ in varprune.create_model("mlp", 1, 10, 28).named_parameters()]
    for i, buf in opt["state"].items():
        name = order[int(i)]
        if name in masks:
            assert torch.all(buf["momentum_buffer"][~masks[name]] == 0), name


def test_finetune_keeps_mask_resumes_after_kill_and_prunes(runs, tmp_path, capsys):
    _, masks = _sweep_weights(runs / "var", 0.95)
    r2 = tmp_path / "R2"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "varprune",
            "finetune",
            str(runs / "var"),
            "--sparsity",
            "0.95",
            "--epochs",
            "2",
            "--limit-train",
            "2048",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(r2),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # killed as soon as the first checkpoint exists: maybe before metrics.jsonl caught up with it
        deadline = time.monotonic() + 240
        while not (r2 / "checkpoint.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (r2 / "model.safetensors").exists()
    rc, out, err = cli(capsys, "train", "--resume", r2, "--quiet")
    assert rc == 0, err
    assert "after epoch 1/2" in out
    lines = [json.loads(x) for x in (r2 / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    cfg = json.loads((r2 / "config.json").read_text())["train"]
    assert cfg["finetune_from"] == str(runs / "var") and cfg["finetune_sparsity"] == 0.95
    _check_mask_kept(r2, masks)
    # the fine-tuned run prunes like any run; at 95% its zeros are exactly what gets pruned
    rc, _, err = cli(capsys, "prune", r2, *SPARS)
    assert rc == 0, err
    doc = json.loads((r2 / "prune.json").read_text())
    at95 = next(r for r in doc["results"] if r["sparsity"] == 0.95)
    assert at95["accuracy"] == doc["dense_accuracy"]
