"""Magnitude pruning: exact sparsity, ties, exclusions, masks (against the old stable argsort); N:M; BN re-tuning."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from varprune import MagnitudePruner, create_model, prunable_weights, prune_magnitude, realised_sparsity, recalibrate_bn
from varprune.numerics.pruning import (
    PruneResult,
    PruningError,
    keep_mask_topk,
    nm_masks,
    parse_pattern,
    prune_nm,
    sparsity_of,
)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 3), nn.Flatten(), nn.LazyLinear(3)
    )


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
    assert zeros_in(net) == 0  # an initial exact 0.0 would be counted as pruned below (conftest seeds every test)
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
                assert [int((p == 0).sum()) for _, p in prunable_weights(net)] == [
                    round(s * p.numel()) for _, p in prunable_weights(net)
                ]


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


# -- the integer-bit-pattern selection against the old stable-argsort algorithm ------------------


def old_masks(named, sparsity, scope):
    """The previous implementation, kept as the reference: a stable float argsort of the magnitudes."""
    lengths = [p.numel() for _, p in named]
    if scope == "global":
        dtype = torch.float64 if any(p.dtype == torch.float64 for _, p in named) else torch.float32
        flat = torch.cat([p.detach().abs().reshape(-1).to(dtype) for _, p in named])
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]] = False
        pieces = keep.split(lengths)
    else:
        pieces = []
        for _, p in named:
            flat = p.detach().abs().reshape(-1)
            flat = flat if flat.dtype == torch.float64 else flat.float()
            keep = torch.ones(flat.numel(), dtype=torch.bool)
            keep[torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]] = False
            pieces.append(keep)
    return {name: piece.view_as(p) for (name, p), piece in zip(named, pieces)}


def weights_of_kind(kind, shapes, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        w = torch.randn(shape, generator=g, dtype=torch.float64)
        if kind == "half-zero":  # an already pruned model: runs of exact zeros, with both signs of zero
            w[torch.rand(shape, generator=g) < 0.5] = 0.0
            w[torch.rand(shape, generator=g) < 0.25] *= -1.0
        elif kind == "quantised":  # few distinct magnitudes: thresholds fall inside long runs of ties
            w = torch.round(w * 2) / 2
        out.append(w.to(dtype))
    return out


def conv_net(*tensors):
    layers = [
        nn.Conv2d(t.shape[1], t.shape[0], t.shape[2], bias=False)
        if t.dim() == 4
        else nn.Linear(t.shape[1], t.shape[0], bias=False)
        for t in tensors
    ]
    net = nn.Sequential(*layers).to(tensors[0].dtype)
    with torch.no_grad():
        for layer, t in zip(net, tensors):
            layer.weight.copy_(t)
    return net


SHAPES = [(8, 3, 3, 3), (16, 8, 3, 3), (10, 16 * 4)]
MANY = [0.0, 0.01, 0.1, 0.25, 0.3, 0.37, 0.5, 0.6, 0.75, 0.8, 0.9, 0.95, 0.99, 0.999]


@pytest.mark.parametrize("kind", ["random", "half-zero", "quantised"])
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pruner_masks_equal_the_stable_argsort_masks(kind, scope, dtype):
    for seed in range(3):
        net = conv_net(*weights_of_kind(kind, SHAPES, seed, dtype))
        named = prunable_weights(net)
        pruner = MagnitudePruner(net, scope)
        for s in MANY:
            got, want = pruner.masks(s), old_masks(named, s, scope)
            assert list(got) == list(want)
            for name in want:
                assert got[name].dtype == torch.bool and got[name].shape == want[name].shape
                assert torch.equal(got[name], want[name]), (kind, scope, seed, s, name)


def test_float64_global_scope_orders_beyond_float32_precision():
    # two magnitudes equal in float32 but not in float64: the smaller one is pruned, wherever it is
    w = torch.tensor([[1.0 + 2**-40, 5.0, 1.0, 7.0]], dtype=torch.float64)
    net = net_with_weights(w).to(torch.float64)
    net[0].weight.data.copy_(w)
    assert MagnitudePruner(net).masks(0.25)["0.weight"].tolist() == [[True, True, False, True]]


def test_pruner_masks_of_a_channels_last_model_follow_the_logical_order():
    net = conv_net(*weights_of_kind("quantised", SHAPES[:2], 0))
    dense = {n: m.clone() for n, m in MagnitudePruner(net).masks(0.6).items()}
    net = net.to(memory_format=torch.channels_last)
    assert not net[1].weight.is_contiguous()
    assert all(torch.equal(m, dense[n]) for n, m in MagnitudePruner(net).masks(0.6).items())


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_nan_weights_are_refused(scope):
    net = conv_net(*weights_of_kind("random", SHAPES, 0))
    with torch.no_grad():
        net[1].weight[3, 2, 1, 0] = float("nan")
    with pytest.raises(PruningError, match="NaN"):
        MagnitudePruner(net, scope)
    with pytest.raises(ValueError, match="NaN"):
        prune_magnitude(net, 0.5, scope)


def test_infinite_weights_are_ranked_largest():
    net = net_with_weights(torch.tensor([[float("-inf"), 0.5, float("inf"), -0.25]]))
    assert prune_magnitude(net, 0.5)["0.weight"].tolist() == [[True, False, True, False]]


def argsort_keep(flat, k):
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep


@pytest.mark.parametrize("method", ["radix", "sort"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "half-zero", "quantised"])
def test_keep_mask_topk_equals_stable_argsort(method, dtype, kind):
    for seed, n in enumerate([1, 2, 3, 17, 1000, 70_000]):
        flat = weights_of_kind(kind, [(n,)], seed, dtype)[0].abs()
        for k in sorted({0, 1, n // 7, n // 2, (2 * n) // 3, n - 1, n}):
            assert torch.equal(keep_mask_topk(flat, k, method=method), argsort_keep(flat, k)), (n, k)


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, -0.0, 1e-30, 0.5, -0.5, 0.50000006, 2.0, 3.5e38, float("inf")])
        | st.floats(-10, 10, width=32),
        min_size=1,
        max_size=40,
    ),
    frac=st.floats(0, 1),
    method=st.sampled_from(["radix", "sort"]),
)
def test_keep_mask_topk_property(values, frac, method):
    flat = torch.tensor(values, dtype=torch.float32).abs()
    k = round(frac * flat.numel())
    keep = keep_mask_topk(flat, k, method=method)
    assert int((~keep).sum()) == k
    assert torch.equal(keep, argsort_keep(flat, k))


def test_keep_mask_topk_rejects_bad_input():
    with pytest.raises(PruningError, match="1-D"):
        keep_mask_topk(torch.ones(2, 2), 1)
    with pytest.raises(PruningError, match="n_pruned"):
        keep_mask_topk(torch.ones(4), 5)
    with pytest.raises(PruningError, match="non-negative"):
        keep_mask_topk(torch.tensor([1.0, -2.0, 3.0]), 1, method="radix")
    with pytest.raises(PruningError, match="method"):
        keep_mask_topk(torch.ones(4), 1, method="quick")
    with pytest.raises(PruningError, match="floating"):
        keep_mask_topk(torch.ones(4, dtype=torch.int32), 1)


def test_keep_mask_topk_half_precision_is_ranked_exactly():
    flat = torch.tensor([0.5, 0.25, 0.5, 0.125, 0.25], dtype=torch.bfloat16)
    assert keep_mask_topk(flat, 3).tolist() == [True, False, True, False, False]  # 0.125, then both 0.25


# -- N:M semi-structured -------------------------------------------------------------------------


def reference_nm_keep(w, n, m):
    """Per group of m along reshape(out, -1): keep the n largest; of equal magnitudes the later is kept."""
    rows = w.detach().double().reshape(w.shape[0], -1).abs().tolist()
    keep = []
    for row in rows:
        out = []
        for start in range(0, len(row), m):
            group = row[start : start + m]
            order = sorted(range(m), key=lambda j: (group[j], j))  # ascending, earlier first among ties
            kept = set(order[m - n :])
            out += [j in kept for j in range(m)]
        keep.append(out)
    return torch.tensor(keep).view(w.shape)


@pytest.mark.parametrize("pattern", ["2:4", "1:2", "4:8", "3:4", "1:16"])
@pytest.mark.parametrize("kind", ["random", "half-zero", "quantised"])
def test_nm_masks_keep_the_n_largest_of_every_group(pattern, kind):
    n, m = parse_pattern(pattern)
    tensors = weights_of_kind(kind, [(4, 16, 1, 1), (6, 8, 2, 2), (5, 32)], 7)
    named = [(f"w{i}", t) for i, t in enumerate(tensors)]
    masks, skipped = nm_masks(named, n, m)
    assert skipped == []
    for name, t in named:
        mask = masks[name]
        assert mask.dtype == torch.bool and mask.shape == t.shape
        groups = mask.reshape(t.shape[0], -1).reshape(-1, m)
        assert bool((groups.sum(1) == n).all())  # every group holds the pattern
        assert torch.equal(mask, reference_nm_keep(t, n, m)), (pattern, kind, name)
        kept, dropped = t.abs().reshape(-1, m), t.abs().reshape(-1, m)
        smallest_kept = torch.where(groups, kept, torch.full_like(kept, float("inf"))).min(1).values
        largest_dropped = torch.where(~groups, dropped, torch.full_like(dropped, -1.0)).max(1).values
        assert bool((smallest_kept >= largest_dropped).all())
    assert realised_sparsity(masks) == pytest.approx(1 - n / m, abs=1e-12)


def test_nm_ties_keep_the_later_weight():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 2.0, -0.0, 0.0]])
    masks, _ = nm_masks([("w", w)], 2, 4)
    assert masks["w"].tolist() == [[False, False, True, True, False, True, False, True]]


def test_nm_groups_run_along_the_flattened_input_dimension_of_a_conv():
    w = torch.zeros(1, 2, 2, 2)
    w[0, 0, 1, 1] = 5.0  # flat position 3 of the row (in, kh, kw) order
    w[0, 1, 0, 0] = 4.0  # flat position 4
    masks, _ = nm_masks([("conv", w)], 1, 4)
    assert masks["conv"].reshape(-1).tolist() == [False, False, False, True, True, False, False, False]


def test_nm_skips_tensors_whose_input_dimension_is_not_a_multiple_of_m():
    net = create_model("resnet20", 1, 10)  # stem conv: in*kh*kw = 9; classifier: 64 inputs
    named = prunable_weights(net)
    masks, skipped = nm_masks(net, 2, 4)
    fan_in = {name: p[0].numel() for name, p in named}
    assert skipped == [name for name, _ in named if fan_in[name] % 4]
    assert "conv1.weight" in skipped and "fc.weight" not in skipped
    assert all(bool(masks[name].all()) for name in skipped)  # left dense
    total = sum(p.numel() for _, p in named)
    pruned = sum(p.numel() // 2 for name, p in named if name not in skipped)
    assert realised_sparsity(masks) == pytest.approx(pruned / total, abs=1e-12)


def test_prune_magnitude_nm_zeroes_in_place_and_honours_exclude():
    net = create_model("resnet20", 1, 10)
    head = net.fc.weight.detach().clone()
    masks = prune_magnitude(net, pattern="2:4", exclude=("last",))
    assert isinstance(masks, PruneResult) and masks.skipped == ["conv1.weight"]
    assert "fc.weight" not in masks and torch.equal(net.fc.weight, head)
    for name, p in prunable_weights(net, ("last",)):
        assert torch.equal(p != 0, masks[name])
    assert masks.keys() == {name for name, _ in prunable_weights(net, ("last",))}
    assert masks.realised_sparsity == pytest.approx(realised_sparsity(dict(masks)))


def test_one_result_type_and_the_old_shapes_still_work():
    """Every public pruning function returns a PruneResult; prune_magnitude's (a dict before) still is one, and
    prune_nm keeps its (masks, skipped) for one release, with a DeprecationWarning."""
    import warnings

    from varprune import PruneResult as Exported
    from varprune.numerics.calibration import PruneResult as OldHome

    assert Exported is PruneResult is OldHome
    net = create_model("resnet20", 1, 10)
    result = prune_magnitude(net, 0.5)
    assert isinstance(result, PruneResult) and isinstance(result, dict) and result.skipped == []
    assert result.realised_sparsity == pytest.approx(0.5, abs=1e-3) and result.fallback == {}
    torch.manual_seed(1)
    new = prune_magnitude(create_model("resnet20", 1, 10), pattern="2:4")
    torch.manual_seed(1)
    with pytest.warns(DeprecationWarning, match="prune_magnitude"):
        masks, skipped = prune_nm(create_model("resnet20", 1, 10), "2:4")
    assert skipped == new.skipped and masks.keys() == new.keys()
    assert all(torch.equal(masks[k], new[k]) for k in masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune_magnitude(create_model("resnet20", 1, 10), 0.5)  # the new way warns nothing
    for bad in (dict(), dict(sparsity=0.5, pattern="2:4")):
        with pytest.raises(PruningError, match="exactly one of sparsity"):
            prune_magnitude(net, **bad)


def test_nm_refuses_nan():
    w = torch.ones(2, 8)
    w[1, 3] = float("nan")
    with pytest.raises(PruningError, match="NaN.*w"):
        nm_masks([("w", w)], 2, 4)


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 4 : 8 ", (4, 8)), ("1:2", (1, 2)), ((2, 4), (2, 4))])
def test_parse_pattern(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("bad", ["4:4", "0:4", "5:4", "2/4", "2:4:8", "a:b", "-1:4", "", (2,), ("x", 4)])
def test_parse_pattern_rejects_bad_patterns(bad):
    with pytest.raises(ValueError, match="N:M pattern"):
        parse_pattern(bad)


@pytest.mark.parametrize("method", ["radix", "sort"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keep_mask_topk_float_masks_and_out_buffer(method, dtype):
    flat = weights_of_kind("half-zero", [(5000,)], 3)[0].abs()
    out = torch.empty(5000, dtype=dtype)
    for k in (0, 1, 1200, 2500, 4999, 5000):  # the same buffer, reused: nothing left over from the last call
        want = argsort_keep(flat, k).to(dtype)
        got = keep_mask_topk(flat, k, method=method, dtype=dtype, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, want), k
    with pytest.raises(PruningError, match="out must be"):
        keep_mask_topk(flat, 3, dtype=dtype, out=torch.empty(4999, dtype=dtype))
    with pytest.raises(PruningError, match="mask dtype"):
        keep_mask_topk(flat, 3, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_raw_negative_zero_is_a_zero_on_both_selection_paths(dtype):
    """-0.0 handed in without abs(): the radix path once raised, the sort path ranked it below +0.0."""
    flat = torch.tensor([0.5, 0.0, -0.0, 0.25, -0.0, 0.0, 1.0, 0.125], dtype=dtype)
    reference = flat.abs().numpy()  # numpy ranks -0.0 and +0.0 equal: ties by position
    for k in range(flat.numel() + 1):
        want = np.ones(flat.numel(), dtype=bool)
        want[np.argsort(reference, kind="stable")[:k]] = False
        for method in ("radix", "sort"):
            got = keep_mask_topk(flat, k, method=method)
            assert got.tolist() == want.tolist(), (k, method)
    with pytest.raises(PruningError, match="non-negative"):
        keep_mask_topk(torch.tensor([0.5, -0.25, -0.0], dtype=dtype), 1, method="radix")
