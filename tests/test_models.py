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
