"""Wanda: masks against an independent float64 transcription of locuslab/wanda, and sequential calibration.

The transcription (``ref_wanda``) is plain Python over numpy arrays, written from the reference's
``prune_wanda`` / ``WrappedGPT`` and sharing no code with ``varprune.numerics.wanda``. The sequential
protocol is recomputed the slow way (``manual_sequential``): full forwards of the model with hooks, one
group of layers at a time, each group pruned before the next group's inputs are recorded.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from varprune.numerics.wanda import prune_wanda


def ref_wanda(W, X, sparsity=None, nm=None):
    """Keep-mask of Wanda for one (out, in) matrix ``W`` with calibration rows ``X`` (tokens, in)."""
    out, cols = W.shape
    norm = [float(np.sqrt(sum(X[t, j] ** 2 for t in range(X.shape[0])))) for j in range(cols)]
    keep = np.ones((out, cols), dtype=bool)
    for r in range(out):
        score = [abs(W[r, j]) * norm[j] for j in range(cols)]
        if nm:
            n, m = nm
            for g in range(0, cols, m):
                for j in sorted(range(g, g + m), key=lambda j: score[j])[: m - n]:  # sorted() is stable
                    keep[r, j] = False
        else:
            for j in sorted(range(cols), key=lambda j: score[j])[: int(cols * sparsity)]:
                keep[r, j] = False
    return keep


def matrix_of(layer):
    w = layer.weight.detach()
    return w.t() if isinstance(layer, Conv1D) else w.reshape(w.shape[0], -1)


def rows_of(layer, x):
    """A layer's input as (tokens, in) rows, the way the references' wrappers see it (convs unfolded)."""
    if isinstance(layer, nn.Conv2d):
        u = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return u.transpose(1, 2).reshape(-1, u.shape[1])
    return x.reshape(-1, x.shape[-1])


def call(model, batch):
    return model(**batch) if isinstance(batch, dict) else model(batch)


KINDS = ["linear", "conv1d", "conv2d"]


def layer_and_batches(kind, dtype=torch.float64):
    """A small layer with tied magnitudes and duplicated input features (so scores tie), and 3 batches."""
    g = torch.Generator().manual_seed(7)
    if kind == "linear":
        layer, shape = nn.Linear(24, 6), (2, 5, 24)
    elif kind == "conv1d":
        layer, shape = Conv1D(6, 24), (2, 5, 24)  # GPT-2's layer: weight (in, out) = (24, 6)
    else:
        layer, shape = nn.Conv2d(4, 5, 2, stride=1, padding=1, dilation=2), (2, 4, 5, 5)  # 16 inputs per row
    with torch.no_grad():
        w = torch.randn(layer.weight.shape, generator=g)
        layer.weight.copy_(torch.round(w * 3) / 3)  # few distinct magnitudes: ties in |W|, zeros included
    batches = []
    for _ in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        x[:, 1] = x[:, 0]  # conv: channel 1 = channel 0; linear: ...
        if kind != "conv2d":
            x[..., 3] = -x[..., 2]  # features 2 and 3 have equal norms
        batches.append(x.to(dtype))
    return layer.to(dtype), batches


def setting_kwargs(setting):
    return {"pattern": setting} if isinstance(setting, str) else {"sparsity": setting}


def ref_for(setting, W, X):
    if isinstance(setting, str):
        n, m = (int(v) for v in setting.split(":"))
        if W.shape[1] % m:  # left dense (the implementation lists it in result.skipped)
            return np.ones(W.shape, dtype=bool)
        return ref_wanda(W, X, nm=(n, m))
    return ref_wanda(W, X, sparsity=setting)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("setting", [0.3, 0.5, 0.77, "2:4", "1:4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masks_equal_the_float64_transcription(kind, setting, dtype):
    layer, batches = layer_and_batches(kind, dtype)
    W = matrix_of(layer).double().numpy().copy()
    X = torch.cat([rows_of(layer, x.double()) for x in batches]).numpy()
    dense = layer.weight.detach().clone()
    ref = ref_for(setting, W, X)
    scores = np.abs(W) * np.sqrt((X**2).sum(0))
    assert any(len(set(row)) < len(row) for row in scores.tolist())  # ties are exercised

    result = prune_wanda(nn.Sequential(layer), iter(batches), **setting_kwargs(setting))
    keep = result["0.weight"]
    assert keep.dtype == torch.bool and keep.shape == layer.weight.shape
    assert np.array_equal(matrix_of_mask(layer, keep), ref)
    w = layer.weight.detach()
    assert torch.equal(w[keep], dense[keep])  # no weight update
    assert not bool(w[~keep].ne(0).any()) and not bool(torch.signbit(w[~keep]).any())  # +0.0
    assert result.realised["0.weight"] == pytest.approx(1 - ref.mean(), abs=1e-12)


def matrix_of_mask(layer, keep):
    return (keep.t() if isinstance(layer, Conv1D) else keep.reshape(keep.shape[0], -1)).numpy()


def test_sparsity_zero_prunes_nothing():
    layer, batches = layer_and_batches("linear")
    dense = layer.weight.detach().clone()
    result = prune_wanda(nn.Sequential(layer), batches, sparsity=0.0)
    assert bool(result["0.weight"].all()) and torch.equal(layer.weight, dense)


# -- sequential calibration ------------------------------------------------------------------------


def manual_sequential(model, batches, groups, setting):
    """Prune ``groups`` of layers (module names) in turn; each group's inputs are recorded in one full forward
    pass per batch of the model in which all earlier groups are pruned already. Returns keep-masks."""
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
                call(model, batch)
        for h in hooks:
            h.remove()
        for name in group:
            layer = model.get_submodule(name)
            X = torch.cat([rows_of(layer, x.double()) for x in seen[name]]).numpy()
            keep = torch.from_numpy(ref_for(setting, matrix_of(layer).double().numpy(), X))
            keep = keep.t().contiguous() if isinstance(layer, Conv1D) else keep.reshape(layer.weight.shape)
            with torch.no_grad():
                layer.weight.masked_fill_(~keep, 0.0)
            masks[f"{name}.weight"] = keep
    return masks


def tiny_gpt2():
    torch.manual_seed(3)
    cfg = GPT2Config(n_embd=16, n_layer=3, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).double().eval()


def tiny_llama():
    torch.manual_seed(4)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).double().eval()


def token_batches(n=3, seqlen=8, pad=False):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        batch = {"input_ids": torch.randint(0, 64, (2, seqlen), generator=g)}
        if pad:  # left padding in the first sequence: a 4-d attention mask reaches the blocks
            mask = torch.ones(2, seqlen, dtype=torch.long)
            mask[0, :3] = 0
            batch["attention_mask"] = mask
        out.append(batch)
    return out


def gpt2_groups(n_layer):
    return [
        [f"transformer.h.{i}.{leaf}" for leaf in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        for i in range(n_layer)
    ]


def llama_groups(n_layer):
    leaves = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    leaves += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    # the untied lm_head is an output embedding, left dense (numerics.weights)
    return [[f"model.layers.{i}.{leaf}" for leaf in leaves] for i in range(n_layer)]


def mlp():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)
    ).double()


def cnn():
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 2, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).double()


def vit():
    from varprune.models import create_model

    torch.manual_seed(2)
    return create_model("vit_tiny", 1, 10, 8, patch=4, dim=8, depth=2, heads=2).double().eval()


def vit_groups():
    leaves = ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")
    return [["patch_embed"]] + [[f"blocks.{i}.{leaf}" for leaf in leaves] for i in range(2)] + [["head"]]


CASES = {
    "mlp": (mlp, lambda: [torch.randn(6, 12, dtype=torch.float64) for _ in range(3)], [["0"], ["2"], ["4"], ["6"]]),
    "cnn": (cnn, lambda: [torch.randn(3, 2, 4, 4, dtype=torch.float64) for _ in range(2)], [["0"], ["2"], ["5"]]),
    "gpt2": (tiny_gpt2, token_batches, gpt2_groups(3)),
    "llama": (tiny_llama, lambda: token_batches(pad=True), llama_groups(2)),
    "vit": (vit, lambda: [torch.randn(3, 1, 8, 8, dtype=torch.float64) for _ in range(2)], vit_groups()),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("setting", [0.6, "2:4"])
def test_statistics_come_from_the_already_pruned_network(case, setting):
    make, make_batches, groups = CASES[case]
    torch.manual_seed(0)
    batches = make_batches()
    expected = manual_sequential(make(), batches, groups, setting)
    dense_stats = manual_sequential(make(), batches, [[n for g in groups for n in g]], setting)
    assert any(not torch.equal(expected[k], dense_stats[k]) for k in expected)  # the test can tell them apart

    model = make()
    result = prune_wanda(model, batches, **setting_kwargs(setting))
    assert list(result) == list(expected)
    for name, keep in expected.items():
        assert torch.equal(result[name], keep), name
    assert result.mode == ("blocks" if case in ("gpt2", "llama", "vit") else "layers")
    if case in ("gpt2", "llama", "vit"):  # one pass per block: the layers of a block see its dense inputs
        one_by_one = manual_sequential(make(), batches, [[n] for g in groups for n in g], setting)
        assert any(not torch.equal(one_by_one[k], expected[k]) for k in expected)


def test_block_by_block_costs_what_the_docstring_says():
    batches = token_batches(n=3)
    result = prune_wanda(tiny_gpt2(), batches, sparsity=0.5)
    assert result.stack == "transformer.h"
    # one ordering forward + 3 partial forwards to capture block 0's inputs; 3 blocks x 3 batches with
    # hooks, and 2 x 3 re-runs of pruned blocks (the last block's outputs are not needed)
    assert result.passes == {"model": 1 + 3, "block": 3 * 3 + 2 * 3}
    result = prune_wanda(tiny_llama(), batches, sparsity=0.5)
    assert result.passes == {"model": 1 + 3, "block": 2 * 3 + 1 * 3}  # its untied lm_head is not pruned
