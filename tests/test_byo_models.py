"""Wide ResNets and the timm adapter."""

import pytest
import torch
import torch.nn.functional as F

from varprune import create_model, prunable_weights, prune_magnitude
from varprune.models import describe_models, list_models
from varprune.models.timm_adapter import TimmModelError, timm_model_problem
from varprune.models.wrn import WideBlock, WideResNet


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _wrn_params(depth, k, cin, classes):
    """Independent closed-form count of WRN-depth-k parameters (convs without bias)."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 9 * cin * 16  # stem
    for g in range(3):
        a, b = widths[g], widths[g + 1]
        for j in range(n):
            c = a if j == 0 else b
            total += 2 * c + 9 * c * b + 2 * b + 9 * b * b  # bn1, conv1, bn2, conv2
            if c != b or (j == 0 and g > 0):
                total += c * b  # 1x1 shortcut
    return total + 2 * widths[3] + widths[3] * classes + classes


@pytest.mark.parametrize("name,depth,k,expect", [("wrn16_8", 16, 8, 10.96e6), ("wrn28_10", 28, 10, 36.48e6)])
def test_wrn_parameter_counts_on_meta(name, depth, k, expect):
    with torch.device("meta"):
        model = create_model(name, 3, 10, 32)
    n = _count(model)
    assert n == _wrn_params(depth, k, 3, 10)
    assert abs(n - expect) / expect < 0.005  # the paper's 11M and 36.5M
    assert all(p.is_meta for p in model.parameters())


def test_wrn_registered_and_described():
    assert {"wrn16_8", "wrn28_10"} <= set(list_models())
    assert "wrn28_10" in describe_models() and "timm:<name>" in describe_models()


def test_wrn_shapes_tiny_input():
    torch.manual_seed(0)
    model = WideResNet(10, 1, in_channels=1, num_classes=7)  # WRN-10-1: same code path, tiny
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
        return (t - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) * m.weight[
            :, None, None
        ] + m.bias[:, None, None]

    a = bn(block.bn1, x).clamp_min(0)
    h = F.conv2d(a, block.conv1.weight, stride=2, padding=1)
    h = F.conv2d(bn(block.bn2, h).clamp_min(0), block.conv2.weight, padding=1)
    ref = h + F.conv2d(a, block.shortcut.weight, stride=2)
    torch.testing.assert_close(block(x), ref)


def test_wrn_depth_checked():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(27, 10)


# ------------------------------------------------------------------ timm


@pytest.fixture
def timm():
    return pytest.importorskip("timm")


def test_timm_resnet18_one_channel_trains_and_prunes(timm):
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


def test_timm_fixed_size_model_gets_img_size(timm):
    model = create_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=5, image_size=32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_timm_unknown_name_suggests_close_ones(timm):
    with pytest.raises(TimmModelError, match="unknown timm model 'resnet81'.*timm:resnet18"):
        create_model("timm:resnet81")
    assert "resnet81" in timm_model_problem("timm:resnet81")
    assert timm_model_problem("timm:resnet18") is None


def test_timm_pretrained_refused(timm):
    from varprune.models.timm_adapter import create_timm_model

    with pytest.raises(TimmModelError, match="--init"):
        create_timm_model("resnet18", pretrained=True)


# ------------------------------------------------------------------ --init weights

from varprune.storage.checkpoint import save_weights  # noqa: E402
from varprune.storage.init_weights import InitWeightsError, load_initial_weights  # noqa: E402


def _net(classes=10, seed=0):
    torch.manual_seed(seed)
    return create_model("resnet20", 1, classes, 28)


def _assert_same_state(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not any(k.startswith(s) for s in skip):
            assert torch.equal(sa[k], sb[k]), k


def test_init_roundtrips_save_weights(tmp_path):
    src = _net(seed=1)
    with torch.no_grad():
        src.bn1.running_mean.normal_()  # buffers come along too
    save_weights(tmp_path / "model.safetensors", src, {"model": "resnet20"})
    dst = _net(seed=2)
    report = load_initial_weights(dst, tmp_path / "model.safetensors")
    _assert_same_state(src, dst)
    assert report.format == "safetensors" and len(report.loaded) == len(src.state_dict())
    assert not report.stripped_prefixes and "loaded" in report.summary()


def test_init_torch_save_wrapped_and_nested(tmp_path):
    src = _net(seed=1)
    wrapped = {"module." + k: v for k, v in src.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "ckpt.pt")
    dst = _net(seed=2)
    report = load_initial_weights(dst, tmp_path / "ckpt.pt")
    _assert_same_state(src, dst)
    assert report.format == "torch" and report.container_key == "state_dict"
    assert report.stripped_prefixes == ["module."] and "module." in report.summary()
    # a plain state dict without wrappers, and without BN's num_batches_tracked
    plain = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(plain, tmp_path / "plain.pth")
    report = load_initial_weights(_net(seed=3), tmp_path / "plain.pth")
    assert report.container_key is None and any(k.endswith("num_batches_tracked") for k in report.kept_from_model)


def test_init_head_of_other_size_needs_exclude(tmp_path):
    src = _net(classes=100, seed=1)
    save_weights(tmp_path / "w.safetensors", src, {})
    dst = _net(classes=10, seed=2)
    head_before = dst.fc.weight.detach().clone()
    conv_before = dst.conv1.weight.detach().clone()
    with pytest.raises(
        InitWeightsError,
        match=r"2 of another shape \(fc.weight: file \[100, 64\], "
        r"model \[10, 64\].*--init-exclude 'fc\.\*'",
    ):
        load_initial_weights(dst, tmp_path / "w.safetensors")
    assert torch.equal(dst.conv1.weight, conv_before)  # untouched on error
    report = load_initial_weights(dst, tmp_path / "w.safetensors", exclude=["fc.*"])
    assert torch.equal(dst.fc.weight, head_before)  # the model's own head
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    _assert_same_state(src, dst, skip=("fc.",))
    assert sorted(report.kept_from_model) == ["fc.bias", "fc.weight"]


def test_init_missing_unexpected_and_garbage(tmp_path):
    state = _net().state_dict()
    state.pop("conv1.weight")
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(InitWeightsError, match=r"1 missing \(conv1.weight\); 1 unexpected \(extra.weight\)"):
        load_initial_weights(_net(), tmp_path / "w.pt")
    (tmp_path / "junk.bin").write_bytes(b"\x00" * 40)
    with pytest.raises(InitWeightsError, match="neither a safetensors file nor a torch.save file"):
        load_initial_weights(_net(), tmp_path / "junk.bin")
    with pytest.raises(InitWeightsError, match="cannot read"):
        load_initial_weights(_net(), tmp_path / "absent.pt")
    torch.save({"epoch": 3}, tmp_path / "noweights.pt")
    with pytest.raises(InitWeightsError, match="not a state dict"):
        load_initial_weights(_net(), tmp_path / "noweights.pt")
