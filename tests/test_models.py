"""Every registered classification model builds for 28 px grey and 32 px colour inputs and has prunable weights."""

import pytest
import torch

from varprune import create_model, list_models, prunable_weights
from varprune.models import model_task


@pytest.mark.parametrize("name", [n for n in list_models() if model_task(n) == "classification"])
@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (3, 32, 100)])
def test_model_forward_and_prunable_weights(name, channels, size, classes):
    torch.manual_seed(0)
    model = create_model(name, channels, classes, size)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    named = prunable_weights(model)
    assert named and all(p.dim() >= 2 for _, p in named)
    # norms, biases, embeddings are never prunable
    ids = {id(p) for _, p in named}
    for pname, p in model.named_parameters():
        if p.dim() < 2 or "pos_embed" in pname or "cls_token" in pname:
            assert id(p) not in ids, pname


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet1000'.*resnet18"):
        create_model("resnet1000")


def test_vit_attention_projections_are_prunable():
    names = [n for n, _ in prunable_weights(create_model("vit_tiny", 3, 10))]
    assert "blocks.0.attn.qkv.weight" in names and "blocks.0.attn.proj.weight" in names
    assert names[0] == "patch_embed.weight" and names[-1] == "head.weight"


def _weights(model) -> int:
    return sum(p.numel() for _, p in prunable_weights(model))


@pytest.mark.parametrize(
    "name,options,expected",
    [
        # counted by hand: hidden layers in*w + w*w, classifier w*10
        ("mlp", dict(width=256), 256 * 256 + 256 * 256 + 256 * 10),
        ("mlp", dict(width=64, depth=3), 256 * 64 + 2 * 64 * 64 + 64 * 10),
        # VGG-16 at width 16: 3x3 convs 1-16-16-32-32-64-64-64-128x6, classifier 128*10
        (
            "vgg16_bn",
            dict(width=16),
            9 * (16 + 16 * 16 + 16 * 32 + 32 * 32 + 32 * 64 + 2 * 64 * 64 + 64 * 128 + 5 * 128 * 128) + 128 * 10,
        ),
        # ViT: patch embedding 16*d, per block qkv 3d^2 + proj d^2 + mlp 8d^2, head d*10
        ("vit_tiny", dict(dim=48, depth=2, heads=4), 16 * 48 + 2 * 12 * 48 * 48 + 48 * 10),
    ],
)
def test_model_options_change_the_architecture(name, options, expected):
    model = create_model(name, 1, 10, 16, **options)
    assert _weights(model) == expected
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("mlp", dict(width=0), "width must be an integer in 1..65536"),
        ("vgg16_bn", dict(width=2.5), "width must be an integer"),
        ("vit_tiny", dict(dim=50, heads=3), r"dim \(50\) must be a multiple of heads \(3\)"),
        ("vit_tiny", dict(patch=40), "patch must be an integer in 1..16"),
    ],
)
def test_bad_model_options_are_refused(name, options, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, 1, 10, 16, **options)
