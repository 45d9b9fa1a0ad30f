"""The training loop on real data: determinism, the schedule, BN re-tuning of a trained, pruned model."""

import itertools

import pytest
import torch
from safetensors.torch import load_file

from varprune import prune_magnitude, recalibrate_bn
from varprune.engine.config import TrainConfig
from varprune.engine.loop import build_model, load_data, lr_factor, train
from varprune.engine.trained import bnt_inputs
from varprune.storage.checkpoint import load_weights
from varprune.tasks import Classification


def accuracy(model, loader):
    return Classification(10).evaluate(model, loader)["accuracy"]


QUICK = dict(model="mlp", epochs=2, batch_size=64, limit_train=2048, limit_test=1000, device="cpu")


def run(tmp_path, name, **kw):
    cfg = TrainConfig(**{**QUICK, **kw})
    train(cfg, tmp_path / name, log=lambda *_: None, progress=False)
    return cfg, load_file(tmp_path / name / "model.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_a_bitwise_identical_run_on_cpu(tmp_path, fmnist_dir):
    _, a = run(tmp_path, "a", method="var", var_lambda=1e-5, seed=3)
    _, b = run(tmp_path, "b", method="var", var_lambda=1e-5, seed=3)
    _, c = run(tmp_path, "c", method="var", var_lambda=1e-5, seed=4)
    assert same(a, b)
    assert not same(a, c)
    metrics = [(tmp_path / n / "metrics.jsonl").read_text().splitlines() for n in "ab"]
    strip = [[line.split('"epoch_time_s"')[0] for line in m] for m in metrics]
    assert strip[0] == strip[1]


def test_var_widens_the_magnitude_distribution(tmp_path, fmnist_dir):
    import json

    run(tmp_path, "sgd", method="sgd")
    run(tmp_path, "var", method="var", var_lambda=1e-4)
    last = {n: json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[-1]) for n in ("sgd", "var")}
    assert last["var"]["mean_layer_variance"] > 1.5 * last["sgd"]["mean_layer_variance"]
    assert last["var"]["var_term"] > 0 and last["sgd"]["var_term"] == 0


def test_bn_retuning_restores_a_pruned_model(tmp_path, fmnist_dir):
    cfg, _ = run(tmp_path, "m", method="sgd")
    data = load_data(cfg, torch.device("cpu"))
    train_loader, test_loader = data.train_loader, data.test_loader
    model = build_model(cfg, data.data.info, torch.device("cpu"))
    load_weights(tmp_path / "m" / "model.safetensors", model)
    dense = accuracy(model, test_loader)
    prune_magnitude(model, 0.9)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    stale_mean = bn.running_mean.clone()
    pruned = accuracy(model, test_loader)
    recalibrate_bn(model, bnt_inputs(train_loader.images, 4, 256, train_loader.normalize))
    retuned = accuracy(model, test_loader)
    assert not torch.allclose(bn.running_mean, stale_mean)
    assert dense > 0.7
    assert retuned > pruned + 0.1, (dense, pruned, retuned)


def test_lr_schedule_warms_up_then_decays_to_zero():
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))
    assert f[-1] < 0.01


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5, bias=False), torch.nn.Tanh(), torch.nn.Linear(5, 3, bias=False)
    ).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    return model, x, y


def _grads(x, y, ws, lam=0.0):
    """float64 autograd gradient of cross-entropy (+ lam * psi) of the tiny tanh network at weights ws."""
    from varprune.numerics.regularizers import var_penalty

    ws = [w.detach().clone().requires_grad_() for w in ws]
    h = torch.tanh(x @ ws[0].T) @ ws[1].T
    loss = torch.nn.functional.cross_entropy(h, y) + (lam * var_penalty(ws) if lam else 0.0)
    return torch.autograd.grad(loss, ws)


def _topk_keep(ws, sparsity):
    flat = torch.cat([w.abs().reshape(-1) for w in ws])
    n_pruned = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:n_pruned]] = False
    return [k.view_as(w) for k, w in zip(keep.split([w.numel() for w in ws]), ws)]


@pytest.mark.parametrize("every_pass", [False, True])
def test_var_with_sam_matches_float64_references(every_pass):
    """var+sam through the loop's own step against hand-written float64 SAM.

    Default: the perturbation comes from the loss alone and VAR's gradient at w
    is added once to the final gradient (lambda means what it means for var).
    ``reg_in_every_pass``: VAR enters both passes (the composition of 0.1).
    """
    from varprune.engine.loop import make_train_step
    from varprune.numerics.regularizers import VarRegularizer
    from varprune.optim import SAM

    model, x, y = _tiny()
    lam, rho, lr = 1e-3, 0.05, 0.1
    w0 = [p.detach().clone() for p in model.parameters()]
    if every_pass:
        g1 = _grads(x, y, w0, lam)
        norm = torch.sqrt(sum((g * g).sum() for g in g1))
        final = _grads(x, y, [w + rho * g / norm for w, g in zip(w0, g1)], lam)
    else:
        g1 = _grads(x, y, w0)
        norm = torch.sqrt(sum((g * g).sum() for g in g1))
        at_e = _grads(x, y, [w + rho * g / norm for w, g in zip(w0, g1)])
        var_at_w = [a - b for a, b in zip(_grads(x, y, w0, lam), g1)]
        final = [a + v for a, v in zip(at_e, var_at_w)]
    expected = [w - lr * g for w, g in zip(w0, final)]

    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    step = make_train_step(
        model,
        model,
        opt,
        [VarRegularizer(model, lam)],
        Classification(3),
        torch.device("cpu"),
        "none",
        reg_in_every_pass=every_pass,
    )
    step(x, y)
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.detach(), e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("every_pass", [False, True])
def test_var_with_cram_plus_matches_float64_references(every_pass):
    """var+cram+: g at w, w' = w + rho g, M = top-k keep-mask of |w'|, final = M g''(M w') + g (+ VAR)."""
    from varprune.engine.loop import make_train_step
    from varprune.numerics.regularizers import VarRegularizer
    from varprune.optim import CrAM

    model, x, y = _tiny()
    lam, rho, lr, k = 1e-3, 0.2, 0.1, 0.5
    w0 = [p.detach().clone() for p in model.parameters()]
    g = _grads(x, y, w0, lam if every_pass else 0.0)
    wp = [w + rho * gi for w, gi in zip(w0, g)]
    masks = _topk_keep(wp, k)
    g2 = _grads(x, y, [m * w for m, w in zip(masks, wp)], lam if every_pass else 0.0)
    final = [m * a + b for m, a, b in zip(masks, g2, g)]
    if not every_pass:
        var_at_w = [a - b for a, b in zip(_grads(x, y, w0, lam), _grads(x, y, w0))]
        final = [f + v for f, v in zip(final, var_at_w)]
    expected = [w - lr * f for w, f in zip(w0, final)]

    opt = CrAM(model.parameters(), torch.optim.SGD, rho=rho, sparsities=(k,), plus=True, lr=lr)
    step = make_train_step(
        model,
        model,
        opt,
        [VarRegularizer(model, lam)],
        Classification(3),
        torch.device("cpu"),
        "none",
        reg_in_every_pass=every_pass,
    )
    step(x, y)
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.detach(), e, rtol=1e-9, atol=1e-12)


def test_var_composition_options_differ():
    """The two compositions give measurably different steps: the tests above can tell them apart."""
    from varprune.engine.loop import make_train_step
    from varprune.numerics.regularizers import VarRegularizer
    from varprune.optim import SAM

    out = []
    for every_pass in (False, True):
        model, x, y = _tiny()
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        make_train_step(
            model,
            model,
            opt,
            [VarRegularizer(model, 1e-3)],
            Classification(3),
            torch.device("cpu"),
            "none",
            reg_in_every_pass=every_pass,
        )(x, y)
        out.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert (out[0] - out[1]).abs().max() > 1e-6
