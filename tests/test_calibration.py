"""The calibration machinery: matrix views, unfolded conv inputs, the block stack, fallbacks, skips, the record,
and every bad input as a one-line PruningError. Both pruners go through the same driver."""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from test_wanda import call, manual_sequential, tiny_gpt2, tiny_llama, token_batches
from varprune.models import create_model
from varprune.numerics.calibration import Target, find_block_stack, unfold_conv
from varprune.numerics.pruning import PruningError, keep_mask_topk, nm_masks
from varprune.numerics.sparsegpt import prune_sparsegpt
from varprune.numerics.wanda import prune_wanda
from varprune.numerics.weights import prunable_weights

PRUNERS = {"wanda": prune_wanda, "sparsegpt": prune_sparsegpt}


# -- matrix views --------------------------------------------------------------------------------

CONVS = [
    (nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 9)),
    (nn.Conv1d(3, 4, 2, dilation=3, padding="same", padding_mode="circular"), (3, 7)),  # unbatched
    (nn.Conv2d(3, 4, 3), (2, 3, 6, 5)),
    (nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), (2, 3, 7, 6)),
    (nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), (2, 3, 5, 5)),
    (nn.Conv2d(3, 4, 2, padding=1, padding_mode="replicate", bias=False), (3, 4, 4)),  # unbatched
    (nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(2, 1, 1)), (2, 2, 5, 6, 4)),
    (nn.Conv3d(2, 3, 3, padding="same", padding_mode="circular"), (1, 2, 4, 4, 4)),
]


@pytest.mark.parametrize("case", range(len(CONVS)))
def test_unfolded_rows_reproduce_the_convolution(case):
    conv, shape = CONVS[case]
    conv = conv.double()
    x = torch.randn(shape, dtype=torch.float64)
    rows = unfold_conv(conv, x)
    assert rows.shape[1] == conv.weight[0].numel()
    out = rows @ conv.weight.reshape(conv.out_channels, -1).t()
    if conv.bias is not None:
        out = out + conv.bias
    expected = conv(x if x.dim() == conv.weight.dim() else x.unsqueeze(0))  # (B, out, *positions)
    expected = expected.movedim(1, -1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_unfold_matches_torch_unfold_for_2d():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(2, 3, 8, 7)
    u = nn.functional.unfold(x, 3, dilation=2, padding=1, stride=2)
    assert torch.equal(unfold_conv(conv, x), u.transpose(1, 2).reshape(-1, 27))


def test_conv1d_of_gpt2_is_viewed_as_its_transpose():
    layer = Conv1D(5, 8)  # weight (in, out) = (8, 5)
    t = Target("w", layer.weight, layer, "transposed")
    x = torch.randn(3, 4, 8)
    rows, W = t.rows(x, torch.float32), t.matrix(torch.float32)
    assert t.columns == 8 and W.shape == (5, 8)
    torch.testing.assert_close(rows @ W.t() + layer.bias, layer(x).reshape(-1, 5))
    assert torch.equal(t.to_param(W), layer.weight)


def test_nm_masks_group_a_models_conv1d_weights_along_their_input_dimension():
    model = tiny_gpt2()
    masks, skipped = nm_masks(model, 2, 4)
    assert not skipped
    for name, p in prunable_weights(model):
        keep_t = masks[name].t()  # (out, in)
        assert bool((keep_t.reshape(-1, 4).sum(1) == 2).all()), name
        expected = nm_masks([("w", p.detach().t())], 2, 4)[0]["w"].t()
        assert torch.equal(masks[name], expected)


# -- the block stack -----------------------------------------------------------------------------


def test_the_block_stack_is_found_where_it_should_be():
    names = lambda m: [n for n, _ in prunable_weights(m)]  # noqa: E731
    gpt2, llama = tiny_gpt2(), tiny_llama()
    vit = create_model("vit_tiny", 1, 10, 8, patch=4, dim=8, depth=3, heads=2)
    assert find_block_stack(gpt2, names(gpt2))[0] == "transformer.h"
    assert find_block_stack(llama, names(llama))[0] == "model.layers"
    assert find_block_stack(vit, names(vit))[0] == "blocks"
    for cnn in (
        "resnet18",
        "resnet20",
        "mlp",
        "vgg16_bn",
        "wrn16_8",
    ):  # stages of Sequentials, mixed Sequentials: no stack
        model = create_model(cnn, 1, 10, 28)
        assert find_block_stack(model, names(model)) is None, cnn
    # the blocks must hold at least half of what is pruned
    assert find_block_stack(vit, ["patch_embed.weight", "head.weight", "blocks.0.attn.qkv.weight"]) is None


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x, scale=1.0):
        return x + scale * self.fc2(torch.tanh(self.fc1(x)))


class Parallel(nn.Module):
    """A stack of blocks that all read the same input: not a chain, so layer by layer."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(sum(b(x) for b in self.blocks))


class Scaled(Parallel):
    """A chain of blocks, but each called with its own argument: block 0's cannot be reused, so layer by layer."""

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x, scale=float(i + 1))
        return self.head(x)


class Shared(nn.Module):
    """One layer called twice in a forward: its statistics come from both calls."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.lin(torch.tanh(self.lin(x))))


@pytest.mark.parametrize("kind", ["parallel", "scaled", "shared"])
def test_models_that_are_not_chains_are_pruned_layer_by_layer(kind):
    torch.manual_seed(0)
    make = {"parallel": Parallel, "scaled": Scaled, "shared": Shared}[kind]
    batches = [torch.randn(5, 8, dtype=torch.float64) for _ in range(2)]
    torch.manual_seed(1)
    model = make().double()
    groups = [[n.rpartition(".")[0]] for n, _ in prunable_weights(model)]  # forward order = module order here
    torch.manual_seed(1)
    expected = manual_sequential(make().double(), batches, groups, 0.5)
    if kind != "shared":
        assert find_block_stack(model, [n for n, _ in prunable_weights(model)])[0] == "blocks"
    result = prune_wanda(model, batches, sparsity=0.5)
    assert result.mode == "layers" and result.stack is None
    for name, keep in expected.items():
        assert torch.equal(result[name], keep), name


class Named(nn.Module):
    """A stack of blocks in an nn.Sequential with names of its own, between a stem and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.body = nn.Sequential(OrderedDict((k, Block()) for k in ("first", "second", "third")))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_a_stack_with_named_children_goes_block_by_block():
    torch.manual_seed(0)
    batches = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    blocks = [[f"body.{k}.fc1", f"body.{k}.fc2"] for k in ("first", "second", "third")]
    torch.manual_seed(1)
    expected = manual_sequential(Named().double(), batches, [["stem"], *blocks, ["head"]], "2:4")
    torch.manual_seed(1)
    result = prune_wanda(Named().double(), batches, pattern="2:4")
    assert result.mode == "blocks" and result.stack == "body"
    assert result.passes == {"model": 1 + 2 + 2 + 2, "block": 3 * 2 + 2 * 2}  # stem and head layer by layer
    for name, keep in expected.items():
        assert torch.equal(result[name], keep), name


# -- fallbacks, skips, exclusions, the record --------------------------------------------------


class Spare(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.spare = Conv1D(4, 8)  # weight (in, out) = (8, 4); never called

    def forward(self, x):
        return self.fc(x)


def test_a_conv1d_that_falls_back_to_n_m_magnitude_is_grouped_along_its_input():
    torch.manual_seed(0)
    model = Spare()
    w = model.spare.weight.detach().clone()
    result = prune_wanda(model, [torch.randn(3, 8)], pattern="2:4")
    assert "never called" in result.fallback["spare.weight"]
    assert torch.equal(result["spare.weight"], nm_masks([("w", w.t())], 2, 4)[0]["w"].t())


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.grouped(torch.relu(self.conv(x)))
        seq = h.flatten(2).transpose(1, 2)
        a, _ = self.attn(seq, seq, seq)
        r, _ = self.rnn(a)
        return self.fc(r.mean(1)) + self.up(h).mean()


FALLBACK_REASONS = {
    "grouped.weight": "grouped convolution",
    "up.weight": "transposed convolution",
    "attn.in_proj_weight": "in_proj_weight",
    "attn.out_proj.weight": "never called",
    "rnn.weight_ih_l0": "recurrent",
    "rnn.weight_hh_l0": "recurrent",
}


@pytest.mark.parametrize("pruner", list(PRUNERS))
@pytest.mark.parametrize("setting", [{"sparsity": 0.6}, {"pattern": "2:4"}])
def test_layers_the_pruners_cannot_handle_fall_back_to_magnitude_and_are_named(pruner, setting):
    torch.manual_seed(0)
    model = Mixed().train()
    before = {n: p.detach().clone() for n, p in prunable_weights(model)}
    result = PRUNERS[pruner](model, [torch.randn(2, 4, 4, 4) for _ in range(2)], **setting)
    assert set(result) == set(before)
    assert set(result.fallback) == set(FALLBACK_REASONS)
    for name, word in FALLBACK_REASONS.items():
        assert word in result.fallback[name], (name, result.fallback[name])
        w = before[name]
        if "pattern" in setting:
            expected = nm_masks([(name, w)], 2, 4)[0][name]
        else:
            expected = keep_mask_topk(w.abs().reshape(-1), round(0.6 * w.numel())).view(w.shape)
        assert torch.equal(result[name], expected), name
    assert model.training and model.attn.training  # modes restored


class FirstCallOnly(nn.Module):
    """Uses ``extra`` in its first forward only: the ordering pass sees it, the calibration passes never do."""

    def __init__(self):
        super().__init__()
        self.fc, self.extra, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        h = self.fc(x)
        return self.out(h + self.extra(h) if self.calls == 1 else h)


@pytest.mark.parametrize("pruner", list(PRUNERS))
def test_a_layer_without_calibration_inputs_falls_back_instead_of_pruning_blind(pruner):
    torch.manual_seed(0)
    model = FirstCallOnly()
    w = model.extra.weight.detach().clone()
    result = PRUNERS[pruner](model, [torch.randn(4, 8)], sparsity=0.5)
    assert (
        list(result.fallback) == ["extra.weight"] and "not called in the calibration" in result.fallback["extra.weight"]
    )
    assert torch.equal(result["extra.weight"], keep_mask_topk(w.abs().reshape(-1), 32).view(8, 8))


def test_a_torch_transformer_encoder_goes_block_by_block_with_attention_by_magnitude():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    model = nn.Sequential(nn.Linear(8, 16), encoder, nn.Linear(16, 4))
    result = prune_sparsegpt(model, [torch.randn(2, 5, 8) for _ in range(2)], sparsity=0.5)
    assert result.mode == "blocks" and result.stack == "1.layers"
    packed = {f"1.layers.{i}.self_attn.{leaf}" for i in range(3) for leaf in ("in_proj_weight", "out_proj.weight")}
    assert set(result.fallback) == packed  # linear1/linear2 are calibrated
    assert torch.backends.mha.get_fastpath_enabled()  # switched off for the calibration only


def test_nm_layers_whose_input_is_not_a_multiple_of_m_stay_dense_and_listed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    before = {n: p.detach().clone() for n, p in prunable_weights(model)}
    for pruner in PRUNERS.values():
        result = pruner(model, [torch.randn(3, 2, 4, 4)], pattern="2:4")
        assert result.skipped == ["0.weight", "4.weight"]  # 2*3*3 = 18 and 6 inputs
        for name in result.skipped:
            assert bool(result[name].all()) and torch.equal(model.get_parameter(name), before[name])
            assert result.realised[name] == 0.0
        assert result.realised["2.weight"] == 0.5
        assert result.realised_sparsity == pytest.approx(0.5 * 96 / (72 + 96 + 18))


@pytest.mark.parametrize("pruner", list(PRUNERS))
def test_exclude_realised_sparsity_and_positive_zeros_on_gpt2(pruner):
    model = tiny_gpt2().float().train()
    model.transformer.h[1].eval()
    modes = [m.training for m in model.modules()]
    kept_out = model.get_parameter("transformer.h.0.attn.c_attn.weight").detach().clone()
    result = PRUNERS[pruner](model, iter(token_batches()), sparsity=0.5, exclude=["transformer.h.0.attn.*"])
    assert [m.training for m in model.modules()] == modes and model.config.use_cache
    names = [n for n, _ in prunable_weights(model, ["transformer.h.0.attn.*"])]
    assert list(result) == names and "transformer.h.0.attn.c_attn.weight" not in result
    assert torch.equal(model.get_parameter("transformer.h.0.attn.c_attn.weight"), kept_out)
    zeros = total = 0
    for name in names:
        p, keep = model.get_parameter(name).detach(), result[name]
        assert keep.dtype == torch.bool and keep.shape == p.shape and keep.device == p.device
        assert not bool(p[~keep].ne(0).any()) and not bool(torch.signbit(p[~keep]).any())
        assert result.realised[name] == pytest.approx(int((~keep).sum()) / keep.numel(), abs=1e-12)
        zeros, total = zeros + int((~keep).sum()), total + keep.numel()
    assert result.realised_sparsity == pytest.approx(zeros / total, abs=1e-12)
    assert result.mode == "blocks" and not result.fallback and not result.skipped


@pytest.mark.parametrize("pruner", list(PRUNERS))
def test_a_generator_and_a_list_of_batches_give_the_same_result(pruner):  # and a cache asked for is not used
    a, b = tiny_llama(), tiny_llama()
    ra = PRUNERS[pruner](a, token_batches(pad=True), pattern="2:4")
    rb = PRUNERS[pruner](b, ({**x, "use_cache": True} for x in token_batches(pad=True)), pattern="2:4")
    for name in ra:
        assert torch.equal(ra[name], rb[name]) and torch.equal(a.get_parameter(name), b.get_parameter(name))
    with torch.no_grad():  # the pruned model still runs on dict batches
        assert torch.isfinite(call(a, token_batches()[0]).logits).all()


# -- bad input -----------------------------------------------------------------------------------


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


BAD = {
    "no batches": ([], {"sparsity": 0.5}, "no calibration batches"),
    "empty generator": ((x for x in []), {"sparsity": 0.5}, "no calibration batches"),
    "single tensor": (torch.randn(4, 8), {"sparsity": 0.5}, "wrap it in a list"),
    "not iterable": (3, {"sparsity": 0.5}, "iterable of batches"),
    "empty batch": ([torch.randn(4, 8), torch.empty(0, 8)], {"sparsity": 0.5}, "batch 1 is empty"),
    "empty dict": ([{}], {"sparsity": 0.5}, "batch 0 is an empty dict"),
    "wrong type": (["text"], {"sparsity": 0.5}, "batch 0 is a str"),
    "wrong shape": ([torch.randn(4, 8), torch.randn(4, 7)], {"sparsity": 0.5}, "cannot run on calibration batch 1"),
    "both": ([torch.randn(4, 8)], {"sparsity": 0.5, "pattern": "2:4"}, "exactly one of sparsity"),
    "neither": ([torch.randn(4, 8)], {}, "exactly one of sparsity"),
    "sparsity 1": ([torch.randn(4, 8)], {"sparsity": 1.0}, "sparsity must be in"),
    "bad pattern": ([torch.randn(4, 8)], {"pattern": "2-4"}, "must look like '2:4'"),
    "N >= M": ([torch.randn(4, 8)], {"pattern": "4:4"}, "0 < N < M"),
    "exclude typo": ([torch.randn(4, 8)], {"sparsity": 0.5, "exclude": ["nope.*"]}, "matches no prunable weight"),
    "exclude all": ([torch.randn(4, 8)], {"sparsity": 0.5, "exclude": ["*"]}, "nothing to prune"),
}


@pytest.mark.parametrize("pruner", list(PRUNERS))
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(pruner, case):
    batches, kwargs, words = BAD[case]
    model = small().train()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match=words) as err:
        PRUNERS[pruner](model, batches, **kwargs)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    assert model.training and all(m.training for m in model.modules())  # restored after the error too
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())  # nothing pruned on bad input


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"blocksize": 0}, "blocksize must be a positive integer"),
        ({"blocksize": 6, "pattern": "2:4"}, "multiple of M"),
        ({"percdamp": -0.1}, "percdamp must be"),
        ({"percdamp": "x"}, "percdamp must be"),
    ],
)
def test_bad_sparsegpt_settings(kwargs, words):
    kwargs = {"sparsity": 0.5, **kwargs} if "pattern" not in kwargs else kwargs
    with pytest.raises(PruningError, match=words):
        prune_sparsegpt(small(), [torch.randn(4, 8)], **kwargs)


def test_a_hugging_face_model_given_tensors_it_cannot_take_says_so():
    with pytest.raises(PruningError, match="cannot run on calibration batch 0") as err:
        prune_wanda(tiny_gpt2(), [torch.randn(2, 8)], sparsity=0.5)  # float ids
    assert "\n" not in str(err.value)


class _Signal(Exception):
    """Stands for the CLI's Terminated (an Exception raised by the SIGTERM handler, wherever the process is)."""


class _Interrupted(nn.Module):
    def __init__(self, error):
        super().__init__()
        self.fc, self.error = nn.Linear(8, 4), error

    def forward(self, x):
        raise self.error


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_a_signal_or_an_allocation_failure_is_not_blamed_on_the_input(pruner):
    """Only a model refusing its input becomes "cannot run on calibration batch"; a SIGTERM arriving mid-forward
    or torch's CPU allocator failing goes on as it is (the CLI says "terminated" or "out of memory", exit 1)."""
    alloc = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: 32768 bytes")
    for error in (_Signal(), alloc):
        with pytest.raises(type(error)) as caught:
            PRUNERS[pruner](_Interrupted(error), [torch.randn(4, 8)], sparsity=0.5)
        assert caught.value is error


def test_the_cpu_allocators_failure_is_out_of_memory_exit_1():
    from varprune.errors import EXIT_SYSTEM, exit_code, one_line

    e = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                     "tried to allocate 32768 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip
    assert exit_code(e) == EXIT_SYSTEM and one_line(e).startswith("out of memory: ")
    with pytest.raises(TypeError):  # any other RuntimeError is a bug: its traceback is shown
        exit_code(RuntimeError("something else"))


# -- what calibration holds in memory (engine/memory.py: estimated before anything is drawn) ----------------------


def test_block_state_bytes_is_one_inputs_hidden_state_between_two_blocks():
    from varprune.engine.memory import block_state_bytes

    gpt2, llama = tiny_gpt2(), tiny_llama()
    ids = torch.zeros(1, 10, dtype=torch.int64)
    for model, width in ((gpt2, gpt2.config.n_embd), (llama, llama.config.hidden_size)):
        dtype_bytes = next(model.parameters()).element_size()
        assert block_state_bytes(model, ids) == 10 * width * dtype_bytes
    vit = create_model("vit_tiny", 1, 10).train()  # 32 x 32 by default, patches of 4: 64 tokens and the class token
    vit.blocks[0].eval()  # a submodule frozen in eval mode inside a training model stays so
    assert block_state_bytes(vit, torch.zeros(1, 1, 32, 32)) == (64 + 1) * vit.blocks[0].norm1.normalized_shape[0] * 4
    assert vit.training and not vit.blocks[0].training and vit.blocks[1].training  # every module's mode given back
    assert block_state_bytes(create_model("mlp", 1, 10), torch.zeros(1, 1, 28, 28)) == 0  # layer by layer: nothing kept
