"""SparseGPT: masks and updated weights against an independent float64 transcription of IST-DASLab/sparsegpt,
sequential calibration, damping, and the layer reconstruction error against magnitude pruning.

The transcription (``ref_sparsegpt``) is numpy float64 with explicit loops, written from the reference's
``SparseGPT.add_batch`` / ``fasterprune`` and sharing no code with ``varprune.numerics.sparsegpt`` (H by a
sum of outer products, its inverse by ``np.linalg.inv``, N:M choices by Python's stable ``sorted``).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from varprune.numerics.calibration import Setting
from varprune.numerics.pruning import PruningError, keep_mask_topk, nm_masks
from varprune.numerics.sparsegpt import inverse_factor, prune_sparsegpt
from varprune.numerics.wanda import prune_wanda


def ref_sparsegpt(W, X, sparsity=None, nm=None, blocksize=128, percdamp=0.01):
    """(new W, keep-mask) of SparseGPT for one (out, in) matrix ``W`` and calibration rows ``X`` (tokens, in)."""
    W = W.copy()
    rows, cols = W.shape
    H = np.zeros((cols, cols))
    for t in range(X.shape[0]):
        H += np.outer(X[t], X[t])
    H *= 2.0 / X.shape[0]
    for j in range(cols):
        if H[j, j] == 0:  # dead input
            H[j, j] = 1.0
            W[:, j] = 0.0
    damp = percdamp * np.mean(np.diag(H))
    for j in range(cols):
        H[j, j] += damp
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor: inv(H) = U.T @ U
    pruned = np.zeros(W.shape, dtype=bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].copy()
        Q1 = np.zeros_like(W1)
        Err1 = np.zeros_like(W1)
        Hinv1 = U[i1:i2, i1:i2]
        mask1 = np.zeros(W1.shape, dtype=bool)
        if nm is None and sparsity > 0:
            tmp = W1**2 / np.diag(Hinv1)[None, :] ** 2
            thresh = np.sort(tmp.ravel())[int(tmp.size * sparsity)]
            mask1 = tmp <= thresh
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                for r in range(rows):
                    score = [W1[r, i + j] ** 2 / Hinv1[i + j, i + j] ** 2 for j in range(m)]
                    for j in sorted(range(m), key=lambda j: score[j])[: m - n]:
                        mask1[r, i + j] = True
            w = W1[:, i].copy()
            q = np.where(mask1[:, i], 0.0, w)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= np.outer(err, Hinv1[i, i:])
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    return W, ~pruned


def matrix_of(t, layer):
    return t.t() if isinstance(layer, Conv1D) else t.reshape(t.shape[0], -1)


def rows_of(layer, x):
    if isinstance(layer, nn.Conv2d):
        u = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return u.transpose(1, 2).reshape(-1, u.shape[1])
    return x.reshape(-1, x.shape[-1])


def layer_and_batches(kind, dtype=torch.float64):
    """A small layer with zero weights and a dead input (ties at tmp = 0), 24 or 16 inputs, and 3 batches."""
    g = torch.Generator().manual_seed(11)
    if kind == "linear":
        layer, shape = nn.Linear(24, 6), (2, 7, 24)
    elif kind == "conv1d":
        layer, shape = Conv1D(6, 24), (2, 7, 24)
    else:
        layer, shape = nn.Conv2d(4, 5, 2, stride=2, padding=1, dilation=1), (3, 4, 5, 5)
    with torch.no_grad():
        w = torch.randn(layer.weight.shape, generator=g)
        w[w.abs() < 0.3] = 0.0  # exact zeros
        layer.weight.copy_(w)
    batches = []
    for _ in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if kind == "conv2d":
            x[:, 2] = 0.0  # a dead input channel
            x[:, 1] = x[:, 0] + 0.1 * x[:, 1]  # correlated channels
        else:
            x[..., 2] = 0.0  # a dead input feature
            x[..., 5] = x[..., 4] + 0.1 * x[..., 5]  # correlated features
        batches.append(x.to(dtype))
    return layer.to(dtype), batches


def parse(setting):
    if isinstance(setting, str):
        n, m = (int(v) for v in setting.split(":"))
        return {"pattern": setting}, {"nm": (n, m)}
    return {"sparsity": setting}, {"sparsity": setting}


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("setting", [0.3, 0.5, 0.8, "2:4", "1:4"])
@pytest.mark.parametrize("blocksize", [8, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masks_and_weights_equal_the_float64_transcription(kind, setting, blocksize, dtype):
    layer, batches = layer_and_batches(kind, dtype)
    W = matrix_of(layer.weight.detach().double(), layer).numpy().copy()
    X = torch.cat([rows_of(layer, x.double()) for x in batches]).numpy()
    ours, theirs = parse(setting)
    W_ref, keep_ref = ref_sparsegpt(W, X, blocksize=blocksize, **theirs)

    result = prune_sparsegpt(nn.Sequential(layer), batches, blocksize=blocksize, **ours)
    keep = result["0.weight"]
    assert keep.dtype == torch.bool and keep.shape == layer.weight.shape
    assert np.array_equal(matrix_of(keep, layer).numpy(), keep_ref)
    w = layer.weight.detach()
    assert w.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(matrix_of(w.double(), layer).numpy(), W_ref, rtol=tol, atol=tol)
    assert not bool(w[~keep].ne(0).any()) and not bool(torch.signbit(w[~keep]).any())  # pruned: +0.0
    assert result.realised["0.weight"] == pytest.approx(1 - keep_ref.mean(), abs=1e-12)
    assert result.realised_sparsity == result.realised["0.weight"]


def test_the_threshold_rule_prunes_every_tie_and_the_count_is_reported():
    # a dead input column gives 6 weights with tmp = 0 in the first block; at 10% of 6x24 = 14 entries the
    # cut lies among many zeros: every weight with tmp <= threshold goes, as in the reference
    layer, batches = layer_and_batches("linear")
    with torch.no_grad():
        layer.weight[:, :4] = 0.0  # 24 + 6 dead-column zeros in the first block of 8 columns
    result = prune_sparsegpt(nn.Sequential(layer), batches, sparsity=0.1, blocksize=8)
    pruned_first_block = int((~result["0.weight"][:, :8]).sum())
    assert pruned_first_block > int(6 * 8 * 0.1) + 1
    keep = result["0.weight"]
    assert result.realised["0.weight"] == pytest.approx(int((~keep).sum()) / keep.numel(), abs=1e-12)
    assert result.realised["0.weight"] > 0.1  # more than asked for, and said so


def test_sparsity_zero_leaves_the_layer_alone():
    layer, batches = layer_and_batches("linear")
    with torch.no_grad():
        layer.weight[:, 2] = 1.0  # the dead column keeps its weights too: nothing is pruned
    dense = layer.weight.detach().clone()
    result = prune_sparsegpt(nn.Sequential(layer), batches, sparsity=0.0)
    assert bool(result["0.weight"].all())
    assert torch.equal(
        torch.cat([layer.weight[:, :2], layer.weight[:, 3:]], 1), torch.cat([dense[:, :2], dense[:, 3:]], 1)
    )


def test_damping_is_raised_when_the_hessian_is_singular():
    # features 0 and 1 identical, integer-valued, 8 tokens: H = [[4, 4], [4, 4], ...] exactly, so with
    # percdamp = 0 the second Cholesky pivot is exactly 0 and the factorisation fails
    x = torch.tensor(
        [
            [2, 2, 0, 0],
            [2, 2, 0, 0],
            [2, 2, 0, 0],
            [2, 2, 0, 0],
            [0, 0, 2, 2],
            [0, 0, 2, -2],
            [0, 0, 2, 2],
            [0, 0, 2, -2],
        ],
        dtype=torch.float64,
    )
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False).double()
    W = layer.weight.detach().numpy().copy()
    result = prune_sparsegpt(nn.Sequential(layer), [x], sparsity=0.5, percdamp=0.0)
    used = result.damping["0.weight"]
    assert used == pytest.approx(1e-5)
    W_ref, keep_ref = ref_sparsegpt(W, x.numpy(), sparsity=0.5, percdamp=used)
    assert np.array_equal(result["0.weight"].numpy(), keep_ref)
    np.testing.assert_allclose(layer.weight.detach().numpy(), W_ref, rtol=1e-8, atol=1e-8)
    # past the bound (damping = mean(diag H)) the layer is named; an indefinite H is the only way there
    with pytest.raises(PruningError, match="layer9.*singular"):
        inverse_factor(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 0.01, "layer9")
    _, used = inverse_factor(torch.tensor([[1.0, 1.5], [1.5, 1.0]]), 0.01, "x")  # eigenvalue -0.5: needs 1.0
    assert used == pytest.approx(1.0)


def test_non_finite_inputs_name_the_layer():
    layer, batches = layer_and_batches("linear")
    batches[1][0, 0, 0] = float("nan")
    with pytest.raises(PruningError, match=r"0\.weight.*not finite") as err:
        prune_sparsegpt(nn.Sequential(layer), batches, sparsity=0.5)
    assert "\n" not in str(err.value)


def test_written_back_in_the_weights_dtype_and_layout():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).to(memory_format=torch.channels_last)
    result = prune_sparsegpt(nn.Sequential(conv), [torch.randn(2, 4, 6, 6)], sparsity=0.5)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight != 0, result["0.weight"] & (conv.weight != 0))
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    result = prune_sparsegpt(nn.Sequential(lin), [torch.randn(4, 16, dtype=torch.bfloat16)], pattern="2:4")
    assert lin.weight.dtype == torch.bfloat16 and not bool(lin.weight[~result["0.weight"]].ne(0).any())
    assert result.realised_sparsity == 0.5


# -- sequential calibration ------------------------------------------------------------------------


def manual_sequential(model, batches, groups, setting, blocksize=128):
    """Each group's inputs from full forwards of the model with all earlier groups pruned (and updated)."""
    _, theirs = parse(setting)
    masks = {}
    for group in groups:
        seen = {name: [] for name in group}
        hooks = [
            model.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name, seen=seen: seen[name].append(a[0])
            )
            for name in group
        ]
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
        for h in hooks:
            h.remove()
        for name in group:
            layer = model.get_submodule(name)
            X = torch.cat([rows_of(layer, x.double()) for x in seen[name]]).numpy()
            W = matrix_of(layer.weight.detach().double(), layer).numpy()
            W_new, keep = ref_sparsegpt(W, X, blocksize=blocksize, **theirs)
            W_new, keep = torch.from_numpy(W_new), torch.from_numpy(keep)
            if isinstance(layer, Conv1D):
                W_new, keep = W_new.t().contiguous(), keep.t().contiguous()
            with torch.no_grad():
                layer.weight.copy_(W_new.reshape(layer.weight.shape))
            masks[f"{name}.weight"] = keep.reshape(layer.weight.shape)
    return masks


def tiny_gpt2():
    torch.manual_seed(3)
    cfg = GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).double().eval()


def mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8)).double()


@pytest.mark.parametrize("case", ["mlp", "gpt2"])
@pytest.mark.parametrize("setting", [0.5, "2:4"])
def test_statistics_come_from_the_already_pruned_and_updated_network(case, setting):
    g = torch.Generator().manual_seed(5)
    if case == "mlp":
        make, groups = mlp, [["0"], ["2"], ["4"]]
        batches = [torch.randn(8, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    else:
        make = tiny_gpt2
        groups = [
            [f"transformer.h.{i}.{leaf}" for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
            for i in range(3)
        ]
        batches = [{"input_ids": torch.randint(0, 64, (2, 8), generator=g)} for _ in range(3)]
    ref_model = make()
    expected = manual_sequential(ref_model, batches, groups, setting, blocksize=8)
    dense_model = make()
    dense_stats = manual_sequential(dense_model, batches, [[n for grp in groups for n in grp]], setting, blocksize=8)
    assert any(
        not torch.allclose(ref_model.get_parameter(k), dense_model.get_parameter(k), atol=1e-6) for k in expected
    )  # the test can tell the protocols apart
    model = make()
    ours, _ = parse(setting)
    result = prune_sparsegpt(model, batches, blocksize=8, **ours)
    assert list(result) == list(expected)
    for name in expected:
        assert torch.equal(result[name], expected[name]), name
        torch.testing.assert_close(model.get_parameter(name), ref_model.get_parameter(name), rtol=1e-9, atol=1e-9)
    assert dense_stats  # used above


# -- SparseGPT beats magnitude where it should ----------------------------------------------------------


def reconstruction_errors(X, W, setting):
    """||X Wᵀ - X Ŵᵀ||² / ||X Wᵀ||² for magnitude (per tensor), Wanda and SparseGPT at one setting."""
    kwargs, theirs = parse(setting)
    dense_out = X @ W.t()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(W)
        if method == "magnitude":
            if "nm" in theirs:
                keep = nm_masks([("w", W)], *theirs["nm"])[0]["w"]
            else:
                keep = keep_mask_topk(W.abs().reshape(-1), round(setting * W.numel())).view(W.shape)
            with torch.no_grad():
                layer.weight.masked_fill_(~keep, 0.0)
        else:
            prune = prune_wanda if method == "wanda" else prune_sparsegpt
            prune(nn.Sequential(layer), list(X.split(1024)), **kwargs)
        with torch.no_grad():
            errors[method] = float((dense_out - layer(X)).square().sum() / dense_out.square().sum())
    return errors


@pytest.mark.parametrize("setting", [0.5, "2:4"])
def test_sparsegpt_reconstructs_a_realistic_layer_better_than_magnitude(setting):
    # 256 inputs driven by 32 latent factors plus noise (strongly correlated), 4096 tokens
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 32, generator=g) @ torch.randn(32, 256, generator=g) + 0.3 * torch.randn(
        4096, 256, generator=g
    )
    W = torch.randn(128, 256, generator=g) / 16
    errors = reconstruction_errors(X, W, setting)
    print(f"\ncorrelated inputs, {setting}: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"]
    assert errors["sparsegpt"] < errors["wanda"]


@pytest.mark.parametrize("setting", [0.5, "2:4"])
def test_wanda_beats_magnitude_when_feature_scales_differ(setting):
    g = torch.Generator().manual_seed(1)
    scales = torch.exp(1.5 * torch.randn(256, generator=g))  # features over ~3 orders of magnitude
    X = torch.randn(4096, 256, generator=g) * scales
    W = torch.randn(128, 256, generator=g) / 16
    errors = reconstruction_errors(X, W, setting)
    print(f"\nscaled inputs, {setting}: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert errors["wanda"] < 0.5 * errors["magnitude"]
    assert errors["sparsegpt"] < errors["magnitude"]


def test_setting_is_read_once():
    assert Setting.of(0.5, None) == Setting(sparsity=0.5)
    assert Setting.of(None, "2:4") == Setting(nm=(2, 4))
