"""Magnitude pruning: exact sparsity, ties, exclusions, masks; BN re-tuning."""
import math

import pytest
import torch
from torch import nn

from varprune import MagnitudePruner, create_model, prunable_weights, prune_magnitude, realised_sparsity, recalibrate_bn
from varprune.pruning import sparsity_of


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3), nn.Flatten(),
                         nn.LazyLinear(3))


def net_with_weights(*tensors):
    net = nn.Sequential(*[nn.Linear(t.shape[1], t.shape[0], bias=False) for t in tensors])
    with torch.no_grad():
        for layer, t in zip(net, tensors):
            layer.weight.copy_(t)
    return net


def zeros_in(net):
    return sum(int((p == 0).sum()) for _, p in prunable_weights(net))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999])
def test_global_sparsity_is_exact(sparsity):
    net = create_model("resnet20", 1, 10)
    n = sum(p.numel() for _, p in prunable_weights(net))
    masks = prune_magnitude(net, sparsity)
    assert zeros_in(net) == round(sparsity * n)
    assert realised_sparsity(masks) == pytest.approx(round(sparsity * n) / n, abs=1e-12)
    for name, p in prunable_weights(net):  # masks match the zeros
        assert torch.equal(masks[name], p != 0)


def test_global_pruning_removes_the_smallest_magnitudes():
    net = small_net()
    net(torch.zeros(1, 1, 8, 8))
    flat = torch.cat([p.detach().abs().reshape(-1) for _, p in prunable_weights(net)])
    threshold = flat.sort().values[round(0.7 * flat.numel())]
    prune_magnitude(net, 0.7)
    kept = torch.cat([p.detach().abs().reshape(-1) for _, p in prunable_weights(net)])
    assert kept[kept > 0].min() >= threshold


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9, 0.97])
def test_layerwise_sparsity_is_exact_per_tensor(sparsity):
    net = create_model("resnet20", 1, 10)
    prune_magnitude(net, sparsity, scope="layerwise")
    for _, p in prunable_weights(net):
        assert int((p == 0).sum()) == round(sparsity * p.numel())


def test_ties_still_give_the_requested_count():
    # every magnitude appears many times: thresholds fall inside runs of ties
    w = torch.tensor([1.0, -1.0, 2.0, -2.0, 1.0, 2.0, -1.0, 3.0] * 25).view(20, 10)
    for scope in ("global", "layerwise"):
        for s in (0.1, 0.3, 0.37, 0.5, 0.8):
            net = net_with_weights(w.clone(), w[:7, :].T.clone())
            n = sum(p.numel() for _, p in prunable_weights(net))
            prune_magnitude(net, s, scope=scope)
            if scope == "global":
                assert zeros_in(net) == round(s * n)
            else:
                assert [int((p == 0).sum()) for _, p in prunable_weights(net)] == \
                    [round(s * p.numel()) for _, p in prunable_weights(net)]


def test_all_equal_tensor():
    net = net_with_weights(torch.full((6, 5), -0.25))
    prune_magnitude(net, 0.4)
    assert zeros_in(net) == 12
    assert set(net[0].weight.unique().tolist()) == {0.0, -0.25}


def test_excluded_layers_are_untouched():
    net = create_model("resnet20", 1, 10)
    stem, head = net.conv1.weight.detach().clone(), net.fc.weight.detach().clone()
    masks = prune_magnitude(net, 0.9, scope="layerwise", exclude=("first", "last"))
    assert torch.equal(net.conv1.weight, stem) and torch.equal(net.fc.weight, head)
    assert "conv1.weight" not in masks and "fc.weight" not in masks
    assert realised_sparsity(masks) == pytest.approx(0.9, abs=1e-4)
    net2 = create_model("resnet20", 1, 10)
    before = {n: p.detach().clone() for n, p in prunable_weights(net2)}
    prune_magnitude(net2, 0.5, exclude=("layers.2.*",))
    for name, p in prunable_weights(net2):
        if name.startswith("layers.2."):
            assert torch.equal(p, before[name])


def test_pruner_sweep_reads_every_sparsity_from_one_sort():
    net = create_model("resnet20", 1, 10)
    pruner = MagnitudePruner(net)
    dense = {n: p.detach().clone() for n, p in prunable_weights(net)}
    previous = None
    for s in (0.5, 0.8, 0.95):
        masks = pruner.masks(s)
        reference = create_model("resnet20", 1, 10)
        reference.load_state_dict(net.state_dict())
        assert all(torch.equal(masks[k], v) for k, v in prune_magnitude(reference, s).items())
        if previous is not None:  # nested: a higher sparsity removes a superset
            assert all(bool((masks[k] <= previous[k]).all()) for k in masks)
        previous = masks
    assert all(torch.equal(p, dense[n]) for n, p in prunable_weights(net))  # masks() does not modify


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan])
def test_bad_sparsity_is_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        prune_magnitude(create_model("resnet20", 1, 10), bad)


def test_unknown_scope_is_rejected():
    with pytest.raises(ValueError, match="scope"):
        prune_magnitude(small_net(), 0.5, scope="channel")


def test_recalibrate_bn_recomputes_running_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4))
    batches = [torch.randn(16, 2, 5, 5) * 3 + 1 for _ in range(4)]
    recalibrate_bn(net, batches)
    assert not net.training
    with torch.no_grad():
        feats = torch.cat([net[0](b) for b in batches])
    # cumulative average over batches of the batch statistics (equal batch sizes)
    assert torch.allclose(net[1].running_mean, feats.mean((0, 2, 3)), atol=1e-5)
    unbiased = torch.stack([net[0](b).detach().var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(net[1].running_var, unbiased, rtol=1e-4)
    assert net[1].momentum == 0.1  # restored


def test_sparsity_of_counts_zeros_over_prunable_weights():
    net = create_model("resnet20", 1, 10)
    prune_magnitude(net, 0.8)
    assert sparsity_of(net) == pytest.approx(0.8, abs=1e-5)
