"""What is prunable: the rule of weights.py on hand-built modules and on two model zoos.

The zoo tests build models on the meta device (names and shapes only) with
torch.nn.init switched off, so that several dozen architectures cost seconds.
"""

import contextlib
import re
import warnings

import pytest
import torch
from torch import nn

from varprune.numerics.weights import WeightSelectionError, classify_parameters, prunable_weights

REASONS = {"embedding", "positional embedding/token", "norm", "bias", "per-channel scale"}


@contextlib.contextmanager
def no_init():
    """Make torch.nn.init's in-place initialisers no-ops (meta tensors hold no values anyway)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda *a, **k: a[0] if a else k.get("tensor"))
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def check_rule_covers(model: nn.Module) -> dict[str, str]:
    """Every dim >= 2 parameter is classified, none 'unknown'; conv/linear weights are prunable."""
    classes = classify_parameters(model)
    expected = [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert sorted(classes) == sorted(expected)
    unknown = {n for n, c in classes.items() if c not in REASONS | {"prunable"}}
    assert not unknown, unknown
    for module_name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.weight is not None and m.weight.dim() >= 2:
            name = f"{module_name}.weight" if module_name else "weight"
            assert classes.get(name, "prunable") == "prunable", name  # (absent only when tied, listed elsewhere)
    names = [n for n, _ in prunable_weights(model)]
    assert names == [n for n, c in classes.items() if c == "prunable"]
    return classes


def torchvision_builders(limit=100e6):
    torchvision = pytest.importorskip("torchvision")
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        weights = torchvision.models.get_model_weights(name)
        if max(w.meta["num_params"] for w in weights) < limit:
            out.append(name)
    return out


def test_torchvision_zoo_is_fully_classified():
    import torchvision

    names = torchvision_builders()
    assert len(names) >= 50 and "vit_b_16" in names and "swin_t" in names
    for name in names:
        with warnings.catch_warnings(), no_init():
            warnings.simplefilter("ignore")
            try:
                with torch.device("meta"):
                    model = torchvision.models.get_model(name, weights=None)
            except NotImplementedError:  # RegNet computes its widths from tensor values
                model = torchvision.models.get_model(name, weights=None)
        classes = check_rule_covers(model)
        assert any(c == "prunable" for c in classes.values()), name
        if name == "vit_b_16":
            vit = classes
    inproj = [n for n in vit if n.endswith("self_attention.in_proj_weight")]
    assert len(inproj) == 12 and all(vit[n] == "prunable" for n in inproj)
    assert vit["encoder.layers.encoder_layer_0.self_attention.out_proj.weight"] == "prunable"
    assert vit["class_token"] == vit["encoder.pos_embedding"] == "positional embedding/token"


TIMM_MODELS = [
    "resnet18",
    "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "convnext_atto",
    "efficientnet_b0",
    "mobilenetv3_small_100",
    "swin_tiny_patch4_window7_224",
    "regnetx_002",
    "levit_128s",
    "mobilevit_xxs",
    "xcit_nano_12_p16_224",
    "maxvit_tiny_rw_224",
    "fastvit_t8",
    "crossvit_tiny_240",
]


def test_timm_models_are_fully_classified():
    timm = pytest.importorskip("timm")
    seen = set()
    for name in TIMM_MODELS:
        with warnings.catch_warnings(), no_init(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False)
        classes = check_rule_covers(model)
        seen.update(classes.values())
        if name == "vit_tiny_patch16_224":
            assert classes["blocks.0.attn.qkv.weight"] == "prunable"
            assert classes["pos_embed"] == classes["cls_token"] == "positional embedding/token"
    assert {"prunable", "positional embedding/token", "bias", "per-channel scale"} <= seen


def test_multihead_attention_projections_are_prunable_in_module_order():
    block = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.LayerNorm(8))
    names = [n for n, _ in prunable_weights(block)]
    assert names == ["0.weight", "1.in_proj_weight", "1.out_proj.weight"]
    cross = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)  # separate q/k/v projections
    assert [n for n, _ in prunable_weights(cross)] == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    ]


class Conv1D(nn.Module):
    """Shaped like transformers' GPT-2 Conv1D (a linear layer with weight (in, out)), without the dependency."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))


class ColumnParallelLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.wpe = nn.Embedding(7, 4)  # GPT-2's positional embedding is a table too
        self.pos_emb = nn.Parameter(torch.zeros(1, 7, 4))
        self.c_attn = Conv1D(12, 4)
        self.proj = ColumnParallelLinear()
        self.rnn = nn.LSTM(4, 4, proj_size=2)
        self.ln = nn.LayerNorm(4)
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))
        self.attention_biases = nn.Parameter(torch.zeros(2, 9))
        self.mystery = nn.Parameter(torch.zeros(3, 4))
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight  # tied to the embedding


def test_rule_on_hand_built_modules():
    model = TinyLM()
    classes = classify_parameters(model)
    assert classes == {
        "pos_emb": "positional embedding/token",
        "gamma": "per-channel scale",
        "attention_biases": "bias",
        "mystery": "unknown",
        "wte.weight": "embedding",  # listed once; the tied lm_head is an embedding too
        "wpe.weight": "embedding",
        "c_attn.weight": "prunable",
        "proj.weight": "prunable",
        "rnn.weight_ih_l0": "prunable",
        "rnn.weight_hh_l0": "prunable",
        "rnn.weight_hr_l0": "prunable",
    }
    assert [n for n, _ in prunable_weights(model)] == [
        "c_attn.weight",
        "proj.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.weight_hr_l0",
    ]
    assert list(classes) == [n for n, p in model.named_parameters() if p.dim() >= 2]  # stable, module order


def test_norm_layers_with_matrix_parameters_are_excluded():
    class LayerNorm2d(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 5))

    assert classify_parameters(nn.Sequential(LayerNorm2d())) == {"0.weight": "norm"}


def net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))


def test_exclude_patterns_first_and_last():
    model = net()
    assert [n for n, _ in prunable_weights(model)] == ["0.weight", "2.weight", "4.weight"]
    assert [n for n, _ in prunable_weights(model, ["first", "last"])] == ["2.weight"]
    assert [n for n, _ in prunable_weights(model, ["2.*"])] == ["0.weight", "4.weight"]
    assert prunable_weights(model, ["*"]) == []


@pytest.mark.parametrize("pattern", ["fisrt", "1.weight", "conv*.weight"])
def test_an_exclude_pattern_that_matches_nothing_is_an_error(pattern):
    with pytest.raises(
        WeightSelectionError,
        match=re.escape(
            f"--exclude pattern '{pattern}' matches no prunable weight; see `varprune prune --list-weights`"
        ),
    ):
        prunable_weights(net(), ["first", pattern])
    assert issubclass(WeightSelectionError, ValueError)


def test_an_untied_lm_head_is_an_output_embedding():
    """A Hugging Face model's output embeddings (its LM head) stay dense when untied, as Wanda and SparseGPT
    leave them; a plain nn.Linear named lm_head in a model without get_output_embeddings is an ordinary layer."""
    from varprune.models import create_model

    untied = create_model("llama", vocab_size=50, max_positions=16, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, intermediate_size=32)  # fmt: skip
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight
    classes = classify_parameters(untied)
    assert classes["lm_head.weight"] == "output embedding"
    assert classes["model.embed_tokens.weight"] == "embedding"
    assert all(not n.startswith("lm_head") for n, _ in prunable_weights(untied))

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 10)

    assert classify_parameters(Plain()) == {"lm_head.weight": "prunable"}
