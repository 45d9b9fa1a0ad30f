"""MaskKeeper: pruned weights stay exactly zero through SGD, AdamW and the SAM-family wrappers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varprune import MagnitudePruner
from varprune.numerics.masking import MaskKeeper
from varprune.optim import S2SAM, SAM, CrAM, frozen_bn_stats

STEPS = 30


def small_net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 5)).to(
        dtype
    )


def batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 1, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (16,), generator=g)) for _ in range(n)
    ]


def plain_step(model, opt, keeper, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if keeper is not None:
        keeper.mask_grads_()
    opt.step()
    if keeper is not None:
        keeper.apply_(opt)


def dense_then_pruned(make_opt, sparsity=0.8):
    """A few dense steps (so the optimizer state is non-zero everywhere), then prune."""
    model = small_net()
    opt = make_opt(model.parameters())
    for x, y in batches(3):
        plain_step(model, opt, None, x, y)
    masks = MagnitudePruner(model).apply(sparsity)
    return model, opt, masks


def pruned_values(model, masks):
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach()[~m] for n, m in masks.items()])


def kept_values(model, masks):
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach()[m] for n, m in masks.items()])


def state_at_pruned(opt, model, masks):
    """Every optimizer-state entry shaped like a masked parameter, at the pruned positions."""
    params = dict(model.named_parameters())
    out = []
    o = opt
    while o is not None:
        for n, m in masks.items():
            for v in o.state.get(params[n], {}).values():
                if isinstance(v, torch.Tensor) and v.shape == m.shape:
                    out.append(v[~m])
        o = getattr(o, "base_optimizer", None)
    return out


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-4, amsgrad=True),
}


@pytest.mark.parametrize("hooks", [True, False])
@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_pruned_weights_stay_zero_and_kept_ones_move(which, hooks):
    model, opt, masks = dense_then_pruned(OPTIMIZERS[which])
    assert any(bool((s != 0).any()) for s in state_at_pruned(opt, model, masks))  # dense state to clean up
    keeper = MaskKeeper(model, masks, hooks=hooks)
    keeper.apply_(opt)
    assert all(bool((s == 0).all()) for s in state_at_pruned(opt, model, masks))
    start = kept_values(model, masks).clone()
    for x, y in batches(STEPS):
        plain_step(model, opt, keeper, x, y)
        assert bool((pruned_values(model, masks) == 0).all())
    assert all(bool((s == 0).all()) for s in state_at_pruned(opt, model, masks))
    moved = (kept_values(model, masks) != start).float().mean()
    assert moved > 0.95, f"only {moved:.0%} of the kept weights moved"


@pytest.mark.parametrize("which", ["sgd-momentum-wd", "adamw"])
def test_without_the_keeper_pruned_weights_come_back(which):
    # the control: the test above can fail (dense momentum / moments revive pruned weights)
    model, opt, masks = dense_then_pruned(OPTIMIZERS[which])
    for x, y in batches(3):
        plain_step(model, opt, None, x, y)
    assert bool((pruned_values(model, masks) != 0).any())


@pytest.mark.parametrize("which", ["sgd-momentum-wd", "adamw"])
def test_masked_gradients_alone_keep_a_fresh_optimizer_sparse(which):
    # hooks only, no apply_ after the step: zeros in, zeros out, for SGD (momentum, wd) and AdamW alike
    model = small_net()
    masks = MagnitudePruner(model).apply(0.8)
    keeper = MaskKeeper(model, masks)
    opt = OPTIMIZERS[which](model.parameters())
    for x, y in batches(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert bool((pruned_values(model, masks) == 0).all())
    assert all(bool((s == 0).all()) for s in state_at_pruned(opt, model, masks))
    keeper.remove()  # hooks gone: gradients are dense again
    opt.zero_grad()
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    params = dict(model.named_parameters())
    assert any(bool((params[n].grad[~m] != 0).any()) for n, m in masks.items())


def test_one_masked_sgd_step_matches_a_float64_reference():
    model = small_net(torch.float64)
    masks = MagnitudePruner(model).apply(0.7)
    keeper = MaskKeeper(model, masks)
    lr, wd = 0.1, 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    x, y = batches(1, torch.float64)[0]
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    # the reference gradient: torch.autograd.grad on a hook-free copy, in float64
    ref = small_net(torch.float64)
    ref.load_state_dict(model.state_dict())
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    ref_grad = dict(zip([n for n, _ in ref.named_parameters()], grads))
    plain_step(model, opt, keeper, x, y)
    for n, m in masks.items():
        want = before[n] - lr * (ref_grad[n] + wd * before[n])
        assert torch.allclose(params[n][m], want[m], rtol=0, atol=1e-14)
        assert bool((params[n][~m] == 0).all())
    for n in params:
        if n not in masks:
            assert torch.allclose(params[n], before[n] - lr * (ref_grad[n] + wd * before[n]), rtol=0, atol=1e-14)


def make_wrapped(kind, params):
    base = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if kind == "sam":
        return SAM(params, torch.optim.SGD, rho=0.05, **base)
    if kind == "asam":
        return SAM(params, torch.optim.SGD, rho=0.5, adaptive=True, **base)
    if kind == "cram+":
        return CrAM(params, torch.optim.SGD, rho=0.05, sparsities=(0.5, 0.7), plus=True, **base)
    if kind == "s2sam":
        return S2SAM(params, torch.optim.SGD, rho=0.05, **base)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["sam", "asam", "cram+", "s2sam"])
def test_sam_family_wrappers_keep_the_mask(kind):
    model = small_net()
    opt = make_wrapped(kind, model.parameters())
    masks = None
    seen_in_closure = []

    def step(x, y, keeper):
        def closure():
            if keeper is not None:  # the perturbed point: pruned weights untouched by the perturbation
                seen_in_closure.append(float(pruned_values(model, masks).abs().max()))
            if kind == "s2sam":
                loss = F.cross_entropy(model(x), y)
            else:
                with frozen_bn_stats(model):
                    loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if kind != "s2sam":
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if keeper is not None:
                keeper.mask_grads_()
        opt.step(closure)
        if keeper is not None:
            keeper.apply_(opt)

    for x, y in batches(3):  # dense first: momentum (and S2-SAM's prev_grad) non-zero everywhere
        step(x, y, None)
    masks = MagnitudePruner(model).apply(0.8)
    keeper = MaskKeeper(model, masks)
    keeper.apply_(opt)
    assert all(bool((s == 0).all()) for s in state_at_pruned(opt, model, masks))
    start = kept_values(model, masks).clone()
    for x, y in batches(STEPS):
        step(x, y, keeper)
        assert bool((pruned_values(model, masks) == 0).all())
    assert max(seen_in_closure) == 0.0
    assert all(bool((s == 0).all()) for s in state_at_pruned(opt, model, masks))
    assert (kept_values(model, masks) != start).float().mean() > 0.95


def test_bad_masks_are_refused():
    model = small_net()
    masks = MagnitudePruner(model).apply(0.5)
    name = next(iter(masks))
    with pytest.raises(ValueError, match="names no parameter"):
        MaskKeeper(model, {"nope": masks[name]})
    with pytest.raises(ValueError, match="shape"):
        MaskKeeper(model, {name: masks[name][:1]})
    with pytest.raises(ValueError, match="bool"):
        MaskKeeper(model, {name: masks[name].float()})
    with pytest.raises(ValueError, match="at least one"):
        MaskKeeper(model, {})
