"""VAR, l1 and Hoyer-square against independent float64 formulas."""

import numpy as np
import pytest
import torch

from varprune import (
    HoyerSquareRegularizer,
    L1Regularizer,
    VarRegularizer,
    hoyer_square_penalty,
    l1_penalty,
    var_penalty,
)

SHAPES = [(16, 3, 3, 3), (10, 16), (32, 8, 1, 1), (4, 4, 5, 5)]


def random_weights(dtype=torch.float64, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(s, generator=g, dtype=torch.float64) * (0.05 + 0.1 * i)).to(dtype).requires_grad_()
        for i, s in enumerate(shapes)
    ]


def psi_numpy(ws, r=1e-8, eps=1e-8):
    """METHOD.md section 1, literally: population variance mean(w~^2) - mean(w~)^2."""
    total = 0.0
    for w in ws:
        a = w.detach().double().numpy().ravel()
        wt = np.sqrt(a * a + r)
        total += 1.0 / ((wt**2).mean() - wt.mean() ** 2 + eps)
    return total


def grad_numpy(w, r=1e-8, eps=1e-8):
    """Closed form: -(2 / (n (V + eps)^2)) (w~_i - mean w~) w_i / w~_i."""
    a = w.detach().double().numpy()
    wt = np.sqrt(a * a + r)
    n = a.size
    v = (wt**2).mean() - wt.mean() ** 2
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
    assert next(iter(v.values())) == pytest.approx(np.var(np.sqrt(a * a + 1e-8)), rel=1e-9)
    assert len(v) == len(ws)


def degenerate_layers(dtype):
    equal = torch.full((8, 6), 0.3, dtype=dtype)
    equal[::2] *= -1  # all magnitudes equal, signs mixed
    return [equal.requires_grad_(), torch.zeros(3, 5, dtype=dtype, requires_grad=True)]


REGULARIZERS = [
    (VarRegularizer, dict(lam=2e-6)),
    (L1Regularizer, dict(strength=1e-3)),
    (HoyerSquareRegularizer, dict(strength=1e-3)),
]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("cls,kw", REGULARIZERS)
def test_fast_gradient_equals_autograd(dtype, rtol, cls, kw):
    shapes = SHAPES + [(64, 32, 3, 3)]
    ws = random_weights(dtype, seed=5, shapes=shapes)
    ws[2:2] = degenerate_layers(dtype)  # an all-equal and an all-zero layer in the middle
    reg = cls(ws, **kw)
    # the reference: autograd of the penalty, in float64 (a float32 run is compared with it too)
    ref_ws = [w.detach().double().requires_grad_() for w in ws]
    reference = torch.autograd.grad(cls(ref_ws, **kw)(), ref_ws)
    value = reg.apply_gradient_()
    assert value.dtype == dtype and value.dim() == 0
    assert value.item() == pytest.approx(cls(ref_ws, **kw)().item(), rel=rtol)
    exact_zero = {VarRegularizer: (2, 3), HoyerSquareRegularizer: (3,), L1Regularizer: ()}[cls]
    largest = max(ref.abs().max().item() for ref in reference)
    for i, (ref, w) in enumerate(zip(reference, ws)):
        assert torch.isfinite(w.grad).all()
        if i in exact_zero:  # VAR: psi's maximum (all equal, all zero); Hoyer: all-zero layers are skipped
            assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(ref) == 0
        elif i == 2:  # Hoyer's all-equal layer: 0 only up to rounding of terms of the ordinary size
            assert (w.grad.double() - ref).abs().max().item() <= rtol * largest
        else:
            assert (w.grad.double() - ref).abs().max().item() <= rtol * ref.abs().max().item(), i


@pytest.mark.parametrize("cls,kw", REGULARIZERS)
def test_mixed_dtypes_are_grouped_and_keep_their_order(cls, kw):
    """Weights of several dtypes: each gets its own gradient, values come back in the weights' order."""
    ws = random_weights(torch.float64, seed=3)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.float32]
    ws = [w.detach().to(d).requires_grad_() for w, d in zip(ws, dtypes)]
    reg = cls(ws, **kw)
    value = reg.apply_gradient_()
    assert value.dtype == torch.float64  # the first weight's device; float64 promotes
    ref_ws = [w.detach().double().requires_grad_() for w in ws]
    ref_reg = cls(ref_ws, **kw)
    reference = torch.autograd.grad(ref_reg(), ref_ws)
    assert value.item() == pytest.approx(ref_reg().item(), rel=1e-3)
    for w, ref in zip(ws, reference):
        assert w.grad.dtype == w.dtype
        tol = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-10}[w.dtype]
        assert (w.grad.double() - ref).abs().max().item() <= tol * ref.abs().max().item(), w.dtype
    if cls is VarRegularizer:
        expected = [np.var(np.sqrt(w.detach().double().numpy().ravel() ** 2 + 1e-8)) for w in ws]
        np.testing.assert_allclose(reg.last_variances.double().numpy(), expected, rtol=1e-4)


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
        np.testing.assert_allclose(w.grad.numpy(), 2 * s1 * np.sign(a) / s2 - 2 * s1**2 * a / s2**2, rtol=1e-9)
    for w in ws:
        w.grad = None
    l1_penalty(ws).backward()
    for w, a in zip(ws, arrays):
        np.testing.assert_array_equal(w.grad.numpy(), np.sign(a))


def test_bad_arguments_are_rejected():
    w = torch.randn(3, 3)
    with pytest.raises(ValueError, match="lam|strength"):
        VarRegularizer([w], lam=-1.0)
    # eps = inf made every term 1 / (V + eps) exactly 0 (training without VAR), NaN made it NaN
    for constants in (dict(r=0.0), dict(r=-1e-8), dict(r=float("nan")), dict(eps=float("inf")), dict(eps=float("nan"))):
        (name,) = constants
        with pytest.raises(ValueError, match=rf"VAR's {name} must be a finite number > 0"):
            VarRegularizer([w], lam=1.0, **constants)
    with pytest.raises(ValueError, match="no prunable"):
        VarRegularizer(torch.nn.BatchNorm2d(3), lam=1.0)


def test_hoyer_skips_all_zero_layers_in_both_paths():
    live = random_weights(shapes=[(4, 5)])[0]
    zero = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    a = live.detach().numpy()
    expected = np.abs(a).sum() ** 2 / (a * a).sum()
    value = hoyer_square_penalty([live, zero])
    assert value.item() == pytest.approx(expected, rel=1e-12)  # NaN before: 0/0
    value.backward()
    assert torch.count_nonzero(zero.grad) == 0 and torch.isfinite(live.grad).all()
    live_grad = live.grad.clone()
    live.grad, zero.grad = None, None
    reg = HoyerSquareRegularizer([live, zero], strength=1.0)
    assert reg.apply_gradient_().item() == pytest.approx(expected, rel=1e-12)
    assert torch.count_nonzero(zero.grad) == 0
    torch.testing.assert_close(live.grad, live_grad, rtol=1e-12, atol=0)


def small_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()


@pytest.mark.parametrize("cls,kw", REGULARIZERS)
def test_scale_follows_a_grad_scaler(cls, kw):
    """Under a real GradScaler, scaled grads + scaled regularizer gradient, unscaled, equal an unscaled run."""
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 3
    grads = []
    for scaled in (False, True):
        net = small_net()
        reg = cls(net, **kw)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        if scaled:
            scaler.scale(loss).backward()
            reg.apply_gradient_(scale=scaler.scale(torch.ones((), dtype=torch.float64)))
            scaler.unscale_(opt)
        else:
            loss.backward()
            reg.apply_gradient_()
        grads.append([p.grad.clone() for p in net.parameters()])
    for unscaled, scaled in zip(*grads):
        assert torch.equal(unscaled, scaled)  # a power-of-two scale commutes with every rounding
    # and both are the float64 autograd gradient of loss + coef * penalty
    net = small_net()
    reg = cls(net, **kw)
    (torch.nn.functional.cross_entropy(net(x), y) + reg()).backward()
    for p, g in zip(net.parameters(), grads[0]):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-14)


def test_scale_as_a_float_multiplies_only_the_added_gradient():
    w = random_weights(shapes=[(6, 5)])[0]
    w.grad = torch.ones_like(w)
    value = VarRegularizer([w], lam=1e-6).apply_gradient_(scale=8.0)
    np.testing.assert_allclose(w.grad.numpy(), 1 + 8.0 * 1e-6 * grad_numpy(w), rtol=1e-9)
    assert value.item() == pytest.approx(1e-6 * psi_numpy([w]), rel=1e-9)  # the value is not scaled


@pytest.mark.parametrize("scale", [torch.ones(2), "2", torch.tensor(1j)])
def test_bad_scale_is_rejected(scale):
    w = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="scale must be"):
        VarRegularizer([w], lam=1.0).apply_gradient_(scale=scale)


def test_apply_gradient_reads_nothing_back_to_the_host():
    ws = random_weights(torch.float32) + degenerate_layers(torch.float32)
    regs = [cls(ws, **kw) for cls, kw in REGULARIZERS]
    reads = {"n": 0}
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def counted(fn):
        def wrapper(self, *a, **k):
            reads["n"] += 1
            return fn(self, *a, **k)

        return wrapper

    try:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, counted(fn))
        for reg in regs:
            reg.apply_gradient_(scale=torch.tensor(1024.0))
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)
    assert reads["n"] == 0


@pytest.mark.parametrize("strength", [0.1, 3.0])
def test_from_strength_resolves_lam_from_the_initial_penalty(strength):
    ws = random_weights(seed=4)
    reg = VarRegularizer.from_strength(ws, strength, r=1e-6, eps=1e-7)
    psi0 = psi_numpy(ws, 1e-6, 1e-7)
    assert reg.strength == strength
    assert reg.lam * psi0 == pytest.approx(strength, rel=1e-12)
    assert reg().item() == pytest.approx(strength, rel=1e-12)  # the term's value at the weights given
    assert (reg.r, reg.eps) == (1e-6, 1e-7)
    plain = VarRegularizer(ws, lam=2e-6)
    assert plain.strength == pytest.approx(2e-6 * psi_numpy(ws), rel=1e-12)
    with pytest.raises(ValueError, match="strength"):
        VarRegularizer.from_strength(ws, -1.0)
