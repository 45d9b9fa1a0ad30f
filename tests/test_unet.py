"""Segmentation models: shapes, padding of odd sizes, gradients, prunable weights, options, a tiny overfit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from varprune.models import ModelError, create_model, list_models, model_options, model_task
from varprune.numerics.metrics import dice_score
from varprune.numerics.weights import prunable_weights

SMALL = {"unet": dict(width=4, depth=2), "unet_resnet18": dict(width=4)}
MULTIPLE = {"unet": 4, "unet_resnet18": 8}


def test_tasks_and_listing():
    assert list_models("segmentation") == ["unet", "unet_resnet18"]
    assert model_task("unet") == "segmentation" and model_task("resnet20") == "classification"
    from varprune.models.registry import TASKS

    assert set().union(*(list_models(t) for t in TASKS)) == set(list_models())
    with pytest.raises(ModelError, match="unknown task 'detection'"):
        list_models("detection")
    with pytest.raises(ModelError, match="unknown model 'unet3d'"):
        model_task("unet3d")


@pytest.mark.parametrize("name", ["unet", "unet_resnet18"])
@pytest.mark.parametrize("size", [(16, 24), (13, 22), (1, 1)])
def test_output_shape_any_size(name, size):
    torch.manual_seed(0)
    model = create_model(name, 3, 5, 16, **SMALL[name])
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5, *size)


@pytest.mark.parametrize("name", ["unet", "unet_resnet18"])
def test_odd_sizes_are_zero_padded_bottom_right_and_cropped(name):
    torch.manual_seed(0)
    model = create_model(name, 1, 3, 16, **SMALL[name]).eval()
    m = MULTIPLE[name]
    x = torch.randn(1, 1, 2 * m + 3, 3 * m - 1, dtype=torch.float64)
    model = model.double()
    padded = F.pad(x, (0, 3 * m - x.shape[-1], 0, 3 * m - x.shape[-2]))
    assert padded.shape[-2:] == (3 * m, 3 * m)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[..., : x.shape[-2], : x.shape[-1]])
        # a size that is already a multiple is not padded: the crop is the identity
        assert model(padded).shape[-2:] == padded.shape[-2:]


def test_non_image_input_is_refused():
    with pytest.raises(ModelError, match=r"\(N, C, H, W\) input"):
        create_model("unet", 1, 2, 16, **SMALL["unet"])(torch.randn(1, 16, 16))


@pytest.mark.parametrize("name", ["unet", "unet_resnet18"])
def test_every_conv_weight_is_prunable_final_1x1_included(name):
    model = create_model(name, 1, 4, 16, **SMALL[name])
    named = dict(prunable_weights(model))
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert len(named) == len(convs)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in convs)
    assert named["head.weight"].shape == (4, 4, 1, 1)  # width 4 -> 4 classes, 1x1
    assert list(named)[-1] == "head.weight"  # "last" in --exclude means the classifier
    # every weight with dim >= 2 is prunable, nothing else is
    assert {n for n, p in model.named_parameters() if p.dim() >= 2} == set(named)


@pytest.mark.parametrize("name", ["unet", "unet_resnet18"])
def test_gradient_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, 2, 3, 16, **SMALL[name])
    x, y = torch.randn(2, 2, 16, 16), torch.randint(0, 3, (2, 16, 16))
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def unet_weight_count(cin, classes, width, depth):
    """Conv weights of the U-Net, from its definition (3x3 double convs, 2x2 transposed ups, 1x1 head)."""
    c = [width * 2**i for i in range(depth + 1)]
    double = lambda a, b: 9 * a * b + 9 * b * b  # noqa: E731
    total = double(cin, c[0]) + sum(double(c[i - 1], c[i]) for i in range(1, depth + 1))
    total += sum(4 * c[i] * c[i - 1] + double(2 * c[i - 1], c[i - 1]) for i in range(1, depth + 1))
    return total + c[0] * classes


def test_options_are_forwarded_and_counted():
    assert model_options("unet") == {"width": 16, "depth": 3, "up": "transpose"}
    for kw in ({}, dict(width=8, depth=2), dict(width=6, depth=4)):
        model = create_model("unet", 1, 2, 64, **kw)
        opts = {**model_options("unet"), **kw}
        want = unet_weight_count(1, 2, opts["width"], opts["depth"])
        assert sum(p.numel() for _, p in prunable_weights(model)) == want
        assert len(model.down) == opts["depth"] + 1
    # the figure in the docstring and the registry line
    assert round(unet_weight_count(1, 2, 16, 3) / 1e6, 3) == 0.481
    assert round(unet_weight_count(1, 2, 64, 4) / 1e6, 1) == 31.0
    bilinear = create_model("unet", 1, 2, 32, width=4, depth=2, up="bilinear")
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in bilinear.modules())
    assert bilinear(torch.randn(1, 1, 12, 12)).shape == (1, 2, 12, 12)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("unet", dict(widht=8), r"model 'unet' has no option widht; its options: width=16, depth=3, up='transpose'"),
        ("unet_resnet18", dict(depth=3), "model 'unet_resnet18' has no option depth"),
        ("resnet20", dict(width=8), "model 'resnet20' has no option width; its options: none"),
        ("unet", dict(width=0), "width must be an integer in 1..4096; got 0"),
        ("unet", dict(depth=2.5), "depth must be an integer in 1..8"),
        ("unet", dict(up="nearest"), "up must be 'transpose' or 'bilinear'"),
    ],
)
def test_bad_options_raise_one_clear_error(name, kwargs, match):
    with pytest.raises(ModelError, match=match):
        create_model(name, 1, 2, 16, **kwargs)
    assert issubclass(ModelError, ValueError)


@pytest.mark.parametrize("name", ["unet", "unet_resnet18"])
def test_tiny_overfit_reaches_high_dice(name):
    # the mask is a pointwise function of the image: 1 where the pixel is bright, 2 where it is dark
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16)
    y = (x[:, 0] > 0.6).long() + 2 * (x[:, 0] < -0.6).long()
    model = create_model(name, 1, 3, 16, **SMALL[name])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = dice_score(model.eval()(x).argmax(1), y, 3)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = dice_score(model.train()(x).argmax(1), y, 3)  # batch statistics: the fitted regime
    assert after > 0.9 and after > before + 0.3, (before, after)
