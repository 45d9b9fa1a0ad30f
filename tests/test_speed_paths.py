"""The fast paths issue 4 asks for, checked by behaviour (never by timing).

* the training loop adds VAR's gradient with ``apply_gradient_`` (closed form),
  never through the autograd penalty;
* the hot loop does not synchronise with the host: the number of host reads
  (``.item()``, ``bool()``, ``float()``, ``int()``, ``.tolist()``) in a run does
  not grow with the number of steps;
* a pruning sweep sorts the magnitudes once per model (once per tensor for
  layer-wise pruning), whatever the number of sparsities;
* ``apply_gradient_`` gives the same gradient for channels_last weights.
"""

import contextlib

import pytest
import torch

from varprune import VarRegularizer
from varprune.data import DATASETS, DeviceLoader
from varprune.engine.config import TrainConfig
from varprune.engine.loop import train
from varprune.engine.sweep import prune_sweep
from varprune.models import create_model
from varprune.numerics import regularizers as regularizers_module
from varprune.tasks import Classification

QUICK = dict(model="mlp", epochs=1, batch_size=64, limit_test=256, device="cpu")

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_host_reads():
    """Count reads of tensor values into Python (each one a host sync on a GPU)."""
    counts = {"n": 0}
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(fn):
        def counted(self, *a, **k):
            counts["n"] += 1
            return fn(self, *a, **k)

        return counted

    for name, fn in saved.items():
        setattr(torch.Tensor, name, wrap(fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_training_loop_uses_the_closed_form_var_gradient(tmp_path, fmnist_dir, monkeypatch):
    calls = {"fast": 0}
    real = VarRegularizer.apply_gradient_

    def fast(self, *args, **kwargs):
        calls["fast"] += 1
        return real(self, *args, **kwargs)

    def forbidden(*a, **k):
        raise AssertionError("the training loop built VAR's autograd penalty")

    monkeypatch.setattr(VarRegularizer, "apply_gradient_", fast)
    monkeypatch.setattr(VarRegularizer, "__call__", forbidden)
    monkeypatch.setattr(regularizers_module, "var_penalty", forbidden)
    cfg = TrainConfig(**QUICK, method="var", var_lambda=1e-5, limit_train=256)
    train(cfg, tmp_path / "run", log=lambda *_: None, progress=False)
    assert calls["fast"] == 256 // 64


@pytest.mark.parametrize("method", ["sgd", "var"])
def test_host_reads_do_not_grow_with_the_number_of_steps(tmp_path, fmnist_dir, method):
    counts = []
    for limit in (256, 768):  # 4 and 12 steps in the epoch
        cfg = TrainConfig(**QUICK, method=method, limit_train=limit)
        with count_host_reads() as c:
            train(cfg, tmp_path / f"{method}{limit}", log=lambda *_: None, progress=False)
        counts.append(c["n"])
    assert counts[0] == counts[1], f"host reads {counts[0]} for 4 steps, {counts[1]} for 12: a sync per step"


def test_device_loader_makes_no_host_reads():
    images = torch.randint(0, 256, (96, 1, 28, 28), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.zeros(96, dtype=torch.long), DATASETS["fashion-mnist"], 32, train=True)
    with count_host_reads() as c:
        batches = list(loader)
    assert len(batches) == 3 and c["n"] == 0


@pytest.mark.parametrize("scope,sorts", [("global", 1), ("layerwise", None)])
def test_a_sweep_sorts_once_per_model(monkeypatch, scope, sorts):
    calls = {"n": 0}
    for name in ("sort", "argsort", "kthvalue", "quantile", "topk", "msort"):
        real = getattr(torch, name)

        def counted(*a, _real=real, **k):
            calls["n"] += 1
            return _real(*a, **k)

        monkeypatch.setattr(torch, name, counted)
    torch.manual_seed(0)
    model = create_model("resnet20", 1, 10, 28)
    x = torch.randn(16, 1, 28, 28)
    test = [(x, torch.zeros(16, dtype=torch.long))]
    n_tensors = sum(1 for p in model.parameters() if p.dim() > 1)
    prune_sweep(model, (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99), Classification(10), test, [x], scope=scope)
    assert calls["n"] == (sorts if sorts is not None else n_tensors)


def test_var_gradient_is_the_same_for_channels_last_weights():
    torch.manual_seed(0)
    a = create_model("resnet20", 3, 10, 32)
    b = create_model("resnet20", 3, 10, 32)
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in b.parameters())
    grads = []
    for model in (a, b):
        reg = VarRegularizer(model, lam=1e-3)
        reg.apply_gradient_()
        grads.append([p.grad.contiguous() for p in reg.weights])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6 * ga.abs().max().item())
