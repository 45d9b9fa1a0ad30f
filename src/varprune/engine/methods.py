"""Training methods: which optimizer and which loss terms each name means.

Every method trains with the same loop (train.py); a method only chooses

* an optimizer: plain SGD, or a two-pass wrapper (SAM, ASAM, CrAM, CrAM+)
  around the same SGD, or single-pass S2-SAM;
* regularizers over the prunable weights (VAR, l1, Hoyer-square), whose
  closed-form gradients are added at the current weights w: after the
  backward pass for plain SGD, and once, to the final gradient, for the
  two-pass methods (loop.make_train_step), so a lambda tuned with ``var``
  means the same in ``var+sam`` and ``var+cram+``.

The base optimizer is SGD unless the config says ``optimizer = "adamw"``
(``getattr(cfg, "optimizer", "sgd")``); the two-pass wrappers then wrap AdamW
the same way. With AdamW a regularizer's gradient is added to ``.grad``
before the step, exactly as autograd would add the gradient of
``loss + lambda * psi``: it goes through AdamW's moment estimates like any
loss term (it is *not* decoupled like AdamW's weight decay, which shrinks
``w`` by ``lr * weight_decay`` outside the moments).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from varprune.numerics.regularizers import HoyerSquareRegularizer, L1Regularizer, Regularizer, VarRegularizer
from varprune.numerics.weights import prunable_weights


@dataclass(frozen=True)
class Method:
    description: str
    optimizer: str = "sgd"  # sgd | sam | asam | cram | cram+ | s2sam
    regularizers: tuple[str, ...] = ()
    hyper: str = ""  # key hyper-parameters, for --help


METHODS = {
    "sgd": Method("plain SGD, the baseline"),
    "var": Method("SGD + VAR, the Variance Amplifying Regularizer", regularizers=("var",), hyper="--var-lambda"),
    "l1": Method("SGD + l1 penalty on prunable weights", regularizers=("l1",), hyper="--l1-alpha"),
    "hoyer": Method("SGD + Hoyer-square (DeepHoyer), per layer", regularizers=("hoyer",), hyper="--hoyer-alpha"),
    "sam": Method("Sharpness-Aware Minimization, two passes per step", optimizer="sam", hyper="--rho"),
    "asam": Method("Adaptive SAM (scale-invariant perturbation)", optimizer="asam", hyper="--rho"),
    "cram": Method("CrAM: gradient at the compressed ascent point", optimizer="cram", hyper="--rho, --cram-sparsities"),
    "cram+": Method(
        "CrAM+: CrAM gradient (masked) plus the dense gradient", optimizer="cram+", hyper="--rho, --cram-sparsities"
    ),
    "s2sam": Method(
        "single-step SAM: perturbation from the previous gradient, one pass", optimizer="s2sam", hyper="--rho"
    ),
    "var+sam": Method(
        "VAR with SAM: VAR's gradient at w added once to SAM's",
        optimizer="sam",
        regularizers=("var",),
        hyper="--var-lambda, --rho",
    ),
    "var+cram+": Method(
        "VAR with CrAM+: VAR's gradient at w added once to CrAM+'s",
        optimizer="cram+",
        regularizers=("var",),
        hyper="--var-lambda, --rho, --cram-sparsities",
    ),
}

# rho when --rho is not given: SAM's CIFAR value (Foret et al.); 2.0 for ASAM, the value the davda54/sam
# reference suggests for it; CrAM's CIFAR-10 configuration (Peste et al.); S2-SAM as SAM
DEFAULT_RHO = {"sam": 0.05, "asam": 2.0, "cram": 0.2, "cram+": 0.2, "s2sam": 0.05}
DEFAULT_CRAM_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def method_help() -> str:
    width = max(map(len, METHODS))
    return "\n".join(
        f"  {name:<{width}}  {m.description}" + (f" [{m.hyper}]" if m.hyper else "") for name, m in METHODS.items()
    )


def build_regularizers(method: Method, model: torch.nn.Module, cfg) -> list[Regularizer]:
    out: list[Regularizer] = []
    for kind in method.regularizers:
        if kind == "var":
            strength = getattr(cfg, "var_strength", None)
            if strength is not None:  # lambda = s / psi(w_init): a strength that transfers across models
                out.append(VarRegularizer.from_strength(model, strength, r=cfg.var_r, eps=cfg.var_eps))
            else:
                out.append(VarRegularizer(model, cfg.var_lambda, r=cfg.var_r, eps=cfg.var_eps))
        elif kind == "l1":
            out.append(L1Regularizer(model, cfg.l1_alpha))
        elif kind == "hoyer":
            out.append(HoyerSquareRegularizer(model, cfg.hoyer_alpha))
    return out


BASE_OPTIMIZERS = ("sgd", "adamw")
ADAMW_BETAS = (0.9, 0.999)


def base_optimizer(cfg) -> tuple[type[torch.optim.Optimizer], dict]:
    """The update rule under every method: ``(class, keyword arguments)``.

    ``cfg.optimizer`` (absent means ``"sgd"``): ``"sgd"`` uses lr, momentum,
    nesterov and weight_decay (coupled, added to the gradient); ``"adamw"``
    uses lr, betas (``cfg.betas`` if present, else (0.9, 0.999)) and
    weight_decay, decoupled as in Loshchilov & Hutter (w <- w - lr * wd * w).
    """
    kind = getattr(cfg, "optimizer", "sgd")
    if kind == "sgd":
        return torch.optim.SGD, dict(
            lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay
        )
    if kind == "adamw":
        betas = tuple(getattr(cfg, "betas", None) or ADAMW_BETAS)
        return torch.optim.AdamW, dict(lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}; choose one of: {', '.join(BASE_OPTIMIZERS)}")


def build_optimizer(method: Method, model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The method's optimizer over all of ``model``'s parameters, on the config's base optimizer."""
    base_cls, base = base_optimizer(cfg)
    params = list(model.parameters())
    if method.optimizer == "sgd":  # the method's optimizer "sgd" means: the base optimizer alone
        return base_cls(params, **base)
    from varprune.numerics import optim

    rho = cfg.rho if cfg.rho is not None else DEFAULT_RHO[method.optimizer]
    if method.optimizer in ("sam", "asam"):
        return optim.SAM(params, base_cls, rho=rho, adaptive=method.optimizer == "asam", **base)
    if method.optimizer in ("cram", "cram+"):
        sparsities = tuple(cfg.cram_sparsities or DEFAULT_CRAM_SPARSITIES)
        # the compression CrAM trains against is the one the evaluation applies: the prunable weights
        return optim.CrAM(
            params,
            base_cls,
            rho=rho,
            sparsities=sparsities,
            plus=method.optimizer == "cram+",
            seed=cfg.seed,
            compress_params=[p for _, p in prunable_weights(model)],
            **base,
        )
    if method.optimizer == "s2sam":
        return optim.S2SAM(params, base_cls, rho=rho, **base)
    raise AssertionError(method.optimizer)
