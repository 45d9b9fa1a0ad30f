"""Wide ResNets and the timm adapter."""
import pytest
import torch
import torch.nn.functional as F

from varprune import create_model, prune_magnitude, prunable_weights
from varprune.models import describe_models, list_models
from varprune.models.timm_adapter import TimmModelError, timm_model_problem
from varprune.models.wrn import WideBlock, WideResNet


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _wrn_params(depth, k, cin, classes):
    """Independent closed-form count of WRN-depth-k parameters (convs without bias)."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 9 * cin * 16                                       # stem
    for g in range(3):
        a, b = widths[g], widths[g + 1]
        for j in range(n):
            c = a if j == 0 else b
            total += 2 * c + 9 * c * b + 2 * b + 9 * b * b     # bn1, conv1, bn2, conv2
            if c != b or (j == 0 and g > 0):
                total += c * b                                  # 1x1 shortcut
    return total + 2 * widths[3] + widths[3] * classes + classes


@pytest.mark.parametrize("name,depth,k,expect", [("wrn16_8", 16, 8, 10.96e6), ("wrn28_10", 28, 10, 36.48e6)])
def test_wrn_parameter_counts_on_meta(name, depth, k, expect):
    with torch.device("meta"):
        model = create_model(name, 3, 10, 32)
    n = _count(model)
    assert n == _wrn_params(depth, k, 3, 10)
    assert abs(n - expect) / expect < 0.005          # the paper's 11M and 36.5M
    assert all(p.is_meta for p in model.parameters())


def test_wrn_registered_and_described():
    assert {"wrn16_8", "wrn28_10"} <= set(list_models())
    assert "wrn28_10" in describe_models() and "timm:<name>" in describe_models()


def test_wrn_shapes_tiny_input():
    torch.manual_seed(0)
    model = WideResNet(10, 1, in_channels=1, num_classes=7)   # WRN-10-1: same code path, tiny
    for size in (28, 32):
        out = model(torch.randn(2, 1, size, size))
        assert out.shape == (2, 7)
    # stride-2 groups: 32 -> 32, 16, 8
    feats = []
    hook = [g.register_forward_hook(lambda m, i, o: feats.append(o.shape)) for g in model.layers]
    model(torch.randn(1, 1, 32, 32))
    assert [tuple(s) for s in feats] == [(1, 16, 32, 32), (1, 32, 16, 16), (1, 64, 8, 8)]
    for h in hook:
        h.remove()
    names = [n for n, _ in prunable_weights(model)]
    assert names[0] == "conv1.weight" and names[-1] == "fc.weight"
    assert "layers.1.0.shortcut.weight" in names


def test_wide_block_is_preactivation():
    """Against an explicit float64 computation of BN-ReLU-conv-BN-ReLU-conv + 1x1 shortcut(preact)."""
    torch.manual_seed(1)
    block = WideBlock(3, 5, stride=2).double().eval()
    for bn in (block.bn1, block.bn2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def bn(m, t):
        return (t - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) \
            * m.weight[:, None, None] + m.bias[:, None, None]

    a = bn(block.bn1, x).clamp_min(0)
    h = F.conv2d(a, block.conv1.weight, stride=2, padding=1)
    h = F.conv2d(bn(block.bn2, h).clamp_min(0), block.conv2.weight, padding=1)
    ref = h + F.conv2d(a, block.shortcut.weight, stride=2)
    torch.testing.assert_close(block(x), ref)


def test_wrn_depth_checked():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(27, 10)


# ------------------------------------------------------------------ timm

timm = pytest.importorskip("timm")


def test_timm_resnet18_one_channel_trains_and_prunes():
    torch.manual_seed(0)
    model = create_model("timm:resnet18", in_channels=1, num_classes=10, image_size=32)
    assert model.conv1.weight.shape[1] == 1 and model.fc.out_features == 10
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.fc.weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.fc.weight)
    masks = prune_magnitude(model, 0.5)
    named = prunable_weights(model)
    n = sum(p.numel() for _, p in named)
    zeros = sum(int((p == 0).sum()) for _, p in named)
    assert zeros == round(0.5 * n) and len(masks) == len(named)
    model.eval()
    assert model(x).shape == (4, 10)


def test_timm_fixed_size_model_gets_img_size():
    model = create_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=5, image_size=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_timm_unknown_name_suggests_close_ones():
    with pytest.raises(TimmModelError, match="unknown timm model 'resnet81'.*timm:resnet18"):
        create_model("timm:resnet81")
    assert "resnet81" in timm_model_problem("timm:resnet81")
    assert timm_model_problem("timm:resnet18") is None


def test_timm_pretrained_refused():
    from varprune.models.timm_adapter import create_timm_model
    with pytest.raises(TimmModelError, match="--init"):
        create_timm_model("resnet18", pretrained=True)
