"""--var-strength s: lambda = s / psi(w_init), for var, var+sam, var+cram+ and finetune, against float64 psi."""

import json

import numpy as np
import pytest
import torch

from varprune import VarRegularizer
from varprune.cli import main
from varprune.data import dataset_info
from varprune.engine.config import TrainConfig
from varprune.engine.loop import build_model

TINY = [
    "--dataset",
    "fashion-mnist",
    "--model",
    "mlp",
    "--epochs",
    "1",
    "--limit-train",
    "128",
    "--limit-test",
    "64",
    "--batch-size",
    "64",
    "--device",
    "cpu",
    "--quiet",
]


def psi64(tensors, r=1e-8, eps=1e-8) -> float:
    """METHOD.md section 1 in float64 numpy: sum over ndim >= 2 tensors of 1 / (Var(sqrt(w^2 + r)) + eps)."""
    total = 0.0
    for w in tensors:
        a = w.detach().double().numpy().ravel()
        wt = np.sqrt(a * a + r)
        total += 1.0 / ((wt**2).mean() - wt.mean() ** 2 + eps)
    return total


def initial_psi(method: str, seed: int = 0) -> float:
    """psi of the model exactly as a run builds it (seed, then the model), computed independently."""
    cfg = TrainConfig(model="mlp", method=method, seed=seed, device="cpu")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset_info("fashion-mnist"), torch.device("cpu"))
    return psi64([p for p in model.parameters() if p.ndim >= 2])


def resolved(run):
    return json.loads((run / "config.json").read_text())


@pytest.fixture(scope="module")
def var_run(tmp_path_factory, fmnist_dir):
    run = tmp_path_factory.mktemp("strength") / "var"
    assert (
        main(
            ["train", *TINY, "--data-dir", str(fmnist_dir), "--method", "var", "--var-strength", "2", "--out", str(run)]
        )
        == 0
    )
    return run


@pytest.mark.parametrize("method", ["var+sam", "var+cram+", "var"])
def test_strength_resolves_lambda_from_the_initial_psi(method, tmp_path, fmnist_dir, var_run):
    s = 0.7 if method != "var" else 2.0
    run = var_run if method == "var" else tmp_path / "run"
    if method != "var":
        assert (
            main(
                [
                    "train",
                    *TINY,
                    "--data-dir",
                    str(fmnist_dir),
                    "--method",
                    method,
                    "--var-strength",
                    str(s),
                    "--out",
                    str(run),
                ]
            )
            == 0
        )
    doc = resolved(run)
    res = doc["resolved"]
    assert doc["train"]["var_strength"] == s
    assert res["var_strength"] == s
    assert res["psi_init"] == pytest.approx(initial_psi(method), rel=1e-9)
    assert res["var_lambda"] * res["psi_init"] == pytest.approx(s, rel=1e-12)
    # the lambda trained with is the resolved one: the logged VAR term of the first epoch is of that size
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < first["var_term"] < 2 * s


@pytest.mark.parametrize("command", ["train", "study", "tune"])
def test_both_flags_are_one_line_and_exit_2(command, tmp_path, capsys, fmnist_dir):
    out = tmp_path / "out"
    extra = ["--sparsity", "0.9"] if command == "tune" else []
    code = main([command, *TINY, "--var-lambda", "1e-4", "--var-strength", "1", *extra, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--var-lambda" in err and "--var-strength" in err
    assert not out.exists()


def test_finetune_strength_lambda_and_inheritance(var_run, tmp_path, capsys):
    base = [
        "finetune",
        str(var_run),
        "--sparsity",
        "0.9",
        "--epochs",
        "1",
        "--limit-train",
        "128",
        "--limit-test",
        "64",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--quiet",
    ]
    source = resolved(var_run)["resolved"]
    # nothing given: the source run's resolved lambda (not s re-resolved at the pruned, trained weights)
    assert main([*base, "--out", str(tmp_path / "inherit")]) == 0
    doc = resolved(tmp_path / "inherit")
    assert doc["train"]["var_strength"] is None
    assert doc["resolved"]["var_lambda"] == source["var_lambda"]
    # an explicit lambda wins over the source's strength
    assert main([*base, "--var-lambda", "1e-3", "--out", str(tmp_path / "lam")]) == 0
    doc = resolved(tmp_path / "lam")
    assert doc["train"]["var_strength"] is None and doc["resolved"]["var_lambda"] == 1e-3
    # an explicit strength is relative to psi at the fine-tuning start (the pruned source weights)
    assert main([*base, "--var-strength", "0.5", "--out", str(tmp_path / "s")]) == 0
    res = resolved(tmp_path / "s")["resolved"]
    assert res["var_lambda"] * res["psi_init"] == pytest.approx(0.5, rel=1e-12)
    assert res["psi_init"] != pytest.approx(source["psi_init"], rel=1e-3)  # another w_init than training's
    # both: exit 2, one line, nothing written
    capsys.readouterr()
    assert main([*base, "--var-lambda", "1e-3", "--var-strength", "1", "--out", str(tmp_path / "both")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "both").exists()


def test_library_from_strength_on_a_model():
    from varprune.models import create_model

    torch.manual_seed(3)
    model = create_model("resnet20", 1, 10, 28)
    weights = [p for p in model.parameters() if p.ndim >= 2]
    reg = VarRegularizer.from_strength(model, 0.38)
    assert reg.psi_init == pytest.approx(psi64(weights), rel=1e-9)
    assert reg.lam == pytest.approx(0.38 / psi64(weights), rel=1e-9)
    assert reg().item() == pytest.approx(0.38, rel=1e-5)  # the term at w_init is s (float32 forward)
    # the same regularizer as a plain one with that lambda: same gradient
    plain = VarRegularizer(model, reg.lam)
    model.zero_grad()
    reg.apply_gradient_()
    g1 = [w.grad.clone() for w in weights]
    model.zero_grad()
    plain.apply_gradient_()
    for a, w in zip(g1, weights):
        torch.testing.assert_close(a, w.grad, rtol=0, atol=0)
    assert VarRegularizer.from_strength(model, 0.0).lam == 0.0
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="strength"):
            VarRegularizer.from_strength(model, bad)
    with torch.no_grad():
        weights[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        VarRegularizer.from_strength(model, 1.0)
