"""Hessian top eigenvalue against the exact float64 spectrum; loss profile restoration."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from varprune.numerics.hessian import AnalysisError, _direction, hessian_top_eigenvalue, loss_profile, mean_loss

F = nn.functional


def _mlp(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(5))
    layers += [nn.Tanh(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics and affine parameters
        bnm = model[1]
        with torch.no_grad():
            bnm.running_mean.uniform_(-0.5, 0.5)
            bnm.running_var.uniform_(0.5, 2.0)
            bnm.weight.uniform_(0.5, 1.5)
            bnm.bias.uniform_(-0.3, 0.3)
    return model


def _batches(n_batches=2, n=8):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
        for _ in range(n_batches)
    ]


def _exact_top(model, batches):
    """Largest-|lambda| eigenvalue of the full Hessian, float64, by numpy."""
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            params[n] = flat[i : i + k].reshape(s)
            i += k
        return sum(F.cross_entropy(functional_call(model, params, (x,)), y) for x, y in batches) / len(batches)

    h = torch.autograd.functional.hessian(f, flat0).numpy()
    assert np.allclose(h, h.T, atol=1e-10)
    eig = np.linalg.eigvalsh(h)
    return eig[np.argmax(np.abs(eig))], eig


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_bits(a, b):
    return all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("bn", [False, True])
def test_top_eigenvalue_matches_exact_hessian(bn):
    model = _mlp(bn).eval()
    batches = _batches()
    exact, spectrum = _exact_top(model, batches)
    before = _state(model)
    got = hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=3000, tol=1e-13, seed=3)
    assert got == pytest.approx(exact, rel=1e-6), spectrum
    assert _same_bits(before, _state(model))


def test_returns_the_largest_magnitude_eigenvalue_with_its_sign():
    """A quadratic loss 0.5 w^T A w with spectrum {-3, 1, 2}: power iteration finds -3."""
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    a = q @ torch.diag(torch.tensor([-3.0, 1.0, 2.0], dtype=torch.float64)) @ q.T

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))

        def forward(self, x):
            return 0.5 * self.w @ a @ self.w + 0 * x.sum()

    got = hessian_top_eigenvalue(Quad(), lambda out, y: out, [(torch.zeros(1), None)], iters=500, tol=1e-12)
    assert got == pytest.approx(-3.0, rel=1e-8)


def test_train_mode_buffers_restored_and_params_subset():
    model = _mlp(True).train()
    batches = _batches()
    before = _state(model)
    # only the last layer: the loss is then convex in it (cross-entropy of a linear map)
    last = list(model[-1].parameters())
    got = hessian_top_eigenvalue(model, F.cross_entropy, batches, iters=200, params=last)
    assert got > 0
    assert _same_bits(before, _state(model))
    assert model.training


def test_user_errors_are_typed():
    model = _mlp(False)
    with pytest.raises(AnalysisError, match="no batches"):
        hessian_top_eigenvalue(model, F.cross_entropy, [])
    with pytest.raises(AnalysisError, match="requires_grad"):
        hessian_top_eigenvalue(model, F.cross_entropy, _batches(), params=[])
    with pytest.raises(AnalysisError, match="scalar"):
        hessian_top_eigenvalue(model, lambda o, y: F.cross_entropy(o, y, reduction="none"), _batches())
    with pytest.raises(AnalysisError, match="alphas"):
        loss_profile(model, F.cross_entropy, _batches(), [])


def test_loss_profile_restores_model_bitwise_and_starts_at_the_loss():
    model = _mlp(True).train()  # train mode: forward passes would move the running statistics
    batches = _batches(3)
    before = _state(model)
    alphas = [-1.0, -0.5, 0.0, 0.25, 1.0]
    prof = loss_profile(model, F.cross_entropy, batches, alphas, seed=5)
    assert _same_bits(before, _state(model))
    assert len(prof) == len(alphas)
    # independent: the mean cross-entropy at the model's weights, computed here by hand
    with torch.no_grad():
        by_hand = sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)
    model.load_state_dict(before)
    assert prof[2] == pytest.approx(by_hand, rel=1e-12)
    assert prof[2] == pytest.approx(mean_loss(model, F.cross_entropy, batches), rel=1e-12)
    assert len(set(prof)) == len(prof)  # the weights did move away from 0


def test_loss_profile_restores_on_error():
    model = _mlp(False)
    before = _state(model)
    calls = []

    def bad_loss(out, y):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        loss_profile(model, bad_loss, _batches(1), [0.5, 1.0, 2.0])
    assert _same_bits(before, _state(model))


def test_direction_is_filter_normalised():
    model = _mlp(True)
    named = list(model.named_parameters())
    with torch.no_grad():
        model[0].weight[2].zero_()  # a pruned filter gets a zero direction
    d = _direction(named, torch.Generator().manual_seed(0))
    for (name, p), u in zip(named, d):
        if p.dim() < 2:
            assert torch.count_nonzero(u) == 0, name
        else:
            torch.testing.assert_close(u.norm(dim=1), p.detach().norm(dim=1), rtol=1e-12, atol=0)


def test_loss_profile_is_invariant_to_the_scale_of_a_batchnormed_layer():
    """Filter normalisation: W1 -> 10 W1 before a BatchNorm (batch statistics) changes
    neither the network nor, with filter-wise scaled directions, its profile."""
    batches = _batches(2, n=16)
    alphas = [-0.8, 0.3, 0.9]
    a = _mlp(True).train()
    b = _mlp(True).train()
    with torch.no_grad():
        b[0].weight.mul_(10.0)
    pa = loss_profile(a, F.cross_entropy, batches, alphas)
    pb = loss_profile(b, F.cross_entropy, batches, alphas)
    np.testing.assert_allclose(pa, pb, rtol=1e-3)
