"""VAR, l1 and Hoyer-square against independent float64 formulas."""
import numpy as np
import pytest
import torch

from varprune import (HoyerSquareRegularizer, L1Regularizer, VarRegularizer, hoyer_square_penalty, l1_penalty,
                      var_penalty)

SHAPES = [(16, 3, 3, 3), (10, 16), (32, 8, 1, 1), (4, 4, 5, 5)]


def random_weights(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * (0.05 + 0.1 * i)).to(dtype).requires_grad_()
            for i, s in enumerate(shapes)]


def psi_numpy(ws, r=1e-8, eps=1e-8):
    """METHOD.md section 1, literally: population variance mean(w~^2) - mean(w~)^2."""
    total = 0.0
    for w in ws:
        a = w.detach().double().numpy().ravel()
        wt = np.sqrt(a * a + r)
        total += 1.0 / ((wt ** 2).mean() - wt.mean() ** 2 + eps)
    return total


def grad_numpy(w, r=1e-8, eps=1e-8):
    """Closed form: -(2 / (n (V + eps)^2)) (w~_i - mean w~) w_i / w~_i."""
    a = w.detach().double().numpy()
    wt = np.sqrt(a * a + r)
    n = a.size
    v = (wt ** 2).mean() - wt.mean() ** 2
    return -(2.0 / (n * (v + eps) ** 2)) * (wt - wt.mean()) * a / wt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_var_penalty_matches_float64_formula(seed):
    ws = random_weights(seed=seed)
    assert var_penalty(ws).item() == pytest.approx(psi_numpy(ws), rel=1e-9)
    assert var_penalty(ws, r=1e-3, eps=1e-4).item() == pytest.approx(psi_numpy(ws, 1e-3, 1e-4), rel=1e-9)


def test_var_gradient_matches_closed_form():
    ws = random_weights()
    var_penalty(ws).backward()
    for w in ws:
        np.testing.assert_allclose(w.grad.numpy(), grad_numpy(w), rtol=1e-7, atol=1e-12 * np.abs(grad_numpy(w)).max())


def test_var_gradcheck():
    ws = random_weights(shapes=[(3, 4), (2, 2, 2)])
    assert torch.autograd.gradcheck(lambda a, b: var_penalty([a, b], r=1e-4, eps=1e-4), tuple(ws))


def test_minimising_psi_raises_every_layer_variance():
    ws = [w.detach().float().requires_grad_() for w in random_weights()]
    reg = VarRegularizer(ws, lam=1.0)
    before = reg.variances()
    opt = torch.optim.SGD(ws, lr=1e-7)
    for _ in range(50):
        opt.zero_grad()
        reg().backward()
        opt.step()
    after = reg.variances()
    assert all(after[k] > before[k] for k in before), (before, after)


def test_var_regularizer_scales_and_reports_variances():
    ws = random_weights()
    reg = VarRegularizer(ws, lam=3e-6)
    assert reg().item() == pytest.approx(3e-6 * psi_numpy(ws), rel=1e-9)
    v = reg.variances()
    a = ws[0].detach().numpy().ravel()
    assert list(v.values())[0] == pytest.approx(np.var(np.sqrt(a * a + 1e-8)), rel=1e-9)
    assert len(v) == len(ws)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("cls,kw", [(VarRegularizer, dict(lam=2e-6)), (L1Regularizer, dict(strength=1e-3)),
                                    (HoyerSquareRegularizer, dict(strength=1e-3))])
def test_fast_gradient_equals_autograd(dtype, rtol, cls, kw):
    shapes = SHAPES + [(64, 32, 3, 3)]
    ws = random_weights(dtype, seed=5, shapes=shapes)
    equal = torch.full((8, 6), 0.3, dtype=dtype)
    equal[::2] *= -1  # all magnitudes equal, signs mixed
    ws.append(equal.requires_grad_())
    reg = cls(ws, **kw)
    reference = torch.autograd.grad(reg(), ws)
    value = reg.apply_gradient_()
    assert value.item() == pytest.approx(reg().item(), rel=rtol)
    # relative to the largest gradient entry: the all-equal layer's true gradient is 0,
    # reached by cancellation of terms of the ordinary size
    scale = max(ref.abs().max().item() for ref in reference)
    for ref, w in zip(reference, ws):
        assert (w.grad - ref).abs().max().item() <= rtol * scale


def test_all_equal_layer_has_zero_var_gradient():
    w = torch.full((5, 7), 0.3, dtype=torch.float32, requires_grad=True)
    reg = VarRegularizer([w], lam=1.0)
    reg.apply_gradient_()
    assert torch.count_nonzero(w.grad) == 0
    assert reg().item() == pytest.approx(1e8, rel=1e-6)  # 1 / eps


def test_apply_gradient_accumulates_into_existing_grad():
    w = random_weights(shapes=[(6, 5)])[0]
    w.grad = torch.ones_like(w)
    VarRegularizer([w], lam=1e-6).apply_gradient_()
    np.testing.assert_allclose(w.grad.numpy(), 1 + 1e-6 * grad_numpy(w), rtol=1e-9)


def test_l1_and_hoyer_match_float64_formulas():
    ws = random_weights()
    arrays = [w.detach().numpy() for w in ws]
    assert l1_penalty(ws).item() == pytest.approx(sum(np.abs(a).sum() for a in arrays), rel=1e-12)
    hs = sum(np.abs(a).sum() ** 2 / (a * a).sum() for a in arrays)
    assert hoyer_square_penalty(ws).item() == pytest.approx(hs, rel=1e-12)
    hoyer_square_penalty(ws).backward()
    for w, a in zip(ws, arrays):
        s1, s2 = np.abs(a).sum(), (a * a).sum()
        np.testing.assert_allclose(w.grad.numpy(), 2 * s1 * np.sign(a) / s2 - 2 * s1 ** 2 * a / s2 ** 2, rtol=1e-9)
    for w in ws:
        w.grad = None
    l1_penalty(ws).backward()
    for w, a in zip(ws, arrays):
        np.testing.assert_array_equal(w.grad.numpy(), np.sign(a))


def test_bad_arguments_are_rejected():
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match="lam|strength"):
        VarRegularizer([w], lam=-1.0)
    with pytest.raises(ValueError, match="r > 0"):
        VarRegularizer([w], lam=1.0, r=0.0)
    with pytest.raises(ValueError, match="no prunable"):
        VarRegularizer(torch.nn.BatchNorm2d(3), lam=1.0)
