"""AdamW as the base optimizer: VAR's gradient through the moments, and under the SAM/CrAM/S2-SAM wrappers."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varprune.engine.methods import build_optimizer, build_regularizers, get_method
from varprune.numerics.regularizers import var_penalty
from varprune.numerics.weights import prunable_weights
from varprune.optim import SAM


def _cfg(**kw):
    base = dict(
        optimizer="adamw",
        lr=1e-2,
        momentum=0.9,
        nesterov=True,
        weight_decay=0.05,
        rho=0.05,
        cram_sparsities=None,
        seed=0,
        var_lambda=1e-3,
        var_r=1e-8,
        var_eps=1e-8,
    )
    return SimpleNamespace(**{**base, **kw})


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def test_build_optimizer_adamw_and_default_sgd():
    model = _mlp()
    opt = build_optimizer(get_method("var"), model, _cfg())
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["betas"] == (0.9, 0.999) and g["weight_decay"] == 0.05 and g["lr"] == 1e-2
    legacy = SimpleNamespace(**{k: v for k, v in vars(_cfg()).items() if k != "optimizer"})
    assert type(build_optimizer(get_method("var"), model, legacy)) is torch.optim.SGD  # absent field: SGD
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*adamw"):
        build_optimizer(get_method("sgd"), model, _cfg(optimizer="adam"))


def test_adamw_with_var_closed_form_equals_autograd_float64():
    """apply_gradient_ before AdamW.step == AdamW on loss + lambda * psi through autograd, 5 steps."""
    cfg = _cfg()
    ours, ref, plain = _mlp(), _mlp(), _mlp()
    method = get_method("var")
    opt = build_optimizer(method, ours, cfg)
    (reg,) = build_regularizers(method, ours, cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    for step in range(5):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        reg.apply_gradient_()
        opt.step()

        ref_opt.zero_grad()
        loss = F.cross_entropy(ref(x), y) + cfg.var_lambda * var_penalty(prunable_weights(ref), cfg.var_r, cfg.var_eps)
        loss.backward()
        ref_opt.step()

        plain_opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()
    for a, b, _c in zip(ours.parameters(), ref.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the regulariser changed the trajectory: the comparison above can fail
    assert any((a - c).abs().max() > 1e-4 for a, c in zip(ours.parameters(), plain.parameters()))


def test_sam_over_adamw_equals_manual_float64():
    """SAM(AdamW): gradient at w + rho g/||g||, AdamW update applied at w (decoupled decay from w)."""
    cfg = _cfg(rho=0.1)
    model, ref = _mlp(), _mlp()
    opt = build_optimizer(get_method("sam"), model, cfg)
    assert isinstance(opt, SAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)

        # reference, by hand
        params = list(ref.parameters())
        g = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, g):
                p.add_(cfg.rho * t / (norm + 1e-12))
        g2 = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
        with torch.no_grad():
            for p, w0, t in zip(params, w, g2):
                p.copy_(w0)
                p.grad = t.clone()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["sam", "asam", "cram+", "s2sam", "var+cram+"])
def test_wrappers_over_adamw_step_and_resume(name):
    """Each wrapper steps on AdamW, and its state dict (AdamW's moments included) resumes the same run."""
    cfg = _cfg()
    method = get_method(name)
    model = _mlp()
    opt = build_optimizer(method, model, cfg)
    regs = build_regularizers(method, model, cfg)

    def step(model, opt, regs, i):
        x, y = _batch(i)

        def closure():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            for r in regs:
                r.apply_gradient_()
            return loss

        if getattr(opt, "caller_runs_first_pass", False):
            opt.zero_grad()
            closure()
        return opt.step(closure)

    before = [p.detach().clone() for p in model.parameters()]
    step(model, opt, regs, 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert any("exp_avg" in s for s in opt.base_optimizer.state.values())

    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(method, twin, cfg)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_regs = build_regularizers(method, twin, cfg)
    step(model, opt, regs, 1)
    step(twin, twin_opt, twin_regs, 1)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
