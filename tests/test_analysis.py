"""Analysis numerics against independent numpy/scipy computations; figures written."""

import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from varprune.numerics import sensitivity as S
from varprune.numerics.pruning import recalibrate_bn
from varprune.report import analysis_figures as AF

F = nn.functional


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 3),
    )


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _png_ok(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.width > 200 and im.height > 200
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 50  # something was drawn


def test_magnitude_histograms_count_every_weight(tmp_path):
    a, b = _cnn(0), _cnn(1)
    with torch.no_grad():
        b[0].weight[0].zero_()  # 9 exact zeros
    h = S.magnitude_histograms({"sgd": a, "var": b}, bins=20)
    assert h["labels"] == ["sgd", "var"] and len(h["edges"]) == 21
    assert list(h["layers"]) == ["0.weight", "3.weight", "7.weight"]
    assert h["zeros"] == {"sgd": 0, "var": 9}
    for label, model in (("sgd", a), ("var", b)):
        n = sum(p.numel() for p in (model[0].weight, model[3].weight, model[7].weight))
        assert sum(h["global"][label]) + h["zeros"][label] == h["numel"][label] == n
        assert np.array_equal(np.sum([h["layers"][k][label] for k in h["layers"]], axis=0), h["global"][label])
    # one bin by hand: weights of layer 3 of run "sgd" with edges[5] <= |w| < edges[6]
    e = h["edges"]
    w = a[3].weight.detach().abs().double()
    assert h["layers"]["3.weight"]["sgd"][5] == int(((w >= e[5]) & (w < e[6])).sum())
    _png_ok(AF.magnitude_histogram_figure(h, tmp_path / "hist.png"))
    _png_ok(AF.layer_histogram_figure(h, tmp_path / "layers.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hist.png", "layers.png"]  # no temporaries left


def test_layer_variances_match_numpy():
    model = _cnn()
    got = S.layer_variances(model)
    for name, p in [("0.weight", model[0].weight), ("3.weight", model[3].weight), ("7.weight", model[7].weight)]:
        w = p.detach().double().numpy()
        assert got[name] == pytest.approx(np.var(np.sqrt(w**2 + 1e-8)), rel=1e-10)


def test_layer_variance_figure_history_and_final_only(tmp_path):
    model = _cnn()
    final = S.layer_variances(model)
    hist = [(e, {k: v * (1 + 0.1 * e) for k, v in final.items()}) for e in range(1, 6)]
    _png_ok(AF.layer_variance_figure(hist, tmp_path / "var.png", final=final, final_epoch=5))
    _png_ok(AF.layer_variance_figure([], tmp_path / "var_old.png", final=final, final_epoch=5))
    with pytest.raises(S.AnalysisError, match="no per-epoch"):
        AF.layer_variance_figure([], tmp_path / "x.png")


def test_global_layer_sparsity_matches_a_numpy_threshold(tmp_path):
    model = _cnn()
    before = _state(model)
    sp = [0.5, 0.9]
    got = S.global_layer_sparsity(model, sp)
    assert _same_bits(before, _state(model))
    ws = {n: p.detach().abs().reshape(-1).numpy() for n, p in model.named_parameters() if p.dim() >= 2}
    allw = np.sort(np.concatenate(list(ws.values())))
    assert len(np.unique(allw)) == len(allw)  # no ties: the threshold is unambiguous
    for s in sp:
        k = round(s * len(allw))
        thr = allw[k - 1]  # the k smallest go
        for n, w in ws.items():
            assert got[s][n] == pytest.approx(float((w <= thr).mean()), abs=0)
        realised = sum(got[s][n] * ws[n].size for n in ws) / len(allw)
        assert realised == pytest.approx(k / len(allw))
    _png_ok(AF.layer_sparsity_figure(got, tmp_path / "sp.png"))


def _callbacks():
    x, y = _data()
    bx, _ = _data(64, seed=2)
    batches = list(bx.split(16))

    def bnt(model):
        recalibrate_bn(model, batches)

    @torch.no_grad()
    def evaluate(model):
        model.eval()
        return -float(F.cross_entropy(model(x), y))  # higher is better, continuous: drops are exact numbers

    return bnt, evaluate


def test_layer_sensitivity_restores_and_matches_a_manual_prune():
    model = _cnn().train()
    with torch.no_grad():
        model[1].running_mean.fill_(0.3)
    bnt, evaluate = _callbacks()
    before = _state(model)
    got = S.layer_sensitivity(model, evaluate, bnt, sparsity=0.75)
    assert _same_bits(before, _state(model))
    assert model.training and all(m.training for m in model.modules())
    assert list(got) == ["0.weight", "3.weight", "7.weight"]
    # independent: a copy, prune layer 3 by its own numpy threshold, BN re-tune, evaluate
    dense = copy.deepcopy(model)
    bnt(dense)
    ref_dense = evaluate(dense)
    pruned = copy.deepcopy(model)
    w = pruned[3].weight.detach()
    k = round(0.75 * w.numel())
    thr = np.sort(w.abs().reshape(-1).numpy())[k - 1]
    with torch.no_grad():
        w[w.abs() <= thr] = 0
    assert int((w == 0).sum()) == k
    bnt(pruned)
    assert got["3.weight"] == pytest.approx(ref_dense - evaluate(pruned), rel=1e-9, abs=1e-12)
    assert got["3.weight"] != 0


class _Res(nn.Module):
    """stem -> BN -> ReLU -> h; out = ReLU(h + BN(branch(h))): a zero branch leaves a path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn1 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.branch, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.stem(x)))
        return self.fc(F.relu(h + self.bn2(self.branch(h))).flatten(1))


def test_layer_sensitivity_zero_drop_for_an_all_zero_layer():
    model = _Res().eval()
    with torch.no_grad():
        model.branch.weight.zero_()
        model.bn1.running_var.fill_(4.0)  # not what re-tuning gives: the dense reference must be re-tuned too
    bnt, evaluate = _callbacks()
    got = S.layer_sensitivity(model, evaluate, bnt, sparsity=0.9)
    assert got["branch.weight"] == 0.0
    assert got["stem.weight"] != 0.0 and got["fc.weight"] != 0.0


def test_layer_sensitivity_restores_on_error():
    model = _cnn()
    before = _state(model)
    bnt, evaluate = _callbacks()
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return evaluate(m)

    with pytest.raises(RuntimeError, match="boom"):
        S.layer_sensitivity(model, failing, bnt)
    assert _same_bits(before, _state(model))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.floats(-5, 5, allow_nan=False)), min_size=3, max_size=25))
def test_spearman_matches_scipy_with_ties(pairs):
    xs = [p[0] for p in pairs]
    ys = [round(p[1], 1) for p in pairs]  # ties on both sides
    ref = scipy.stats.spearmanr(xs, ys).statistic if len(set(xs)) > 1 and len(set(ys)) > 1 else float("nan")
    got = S.spearman(xs, ys)
    if math.isnan(ref):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(ref, abs=1e-12)


def test_spearman_edges():
    assert S.spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert S.spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert math.isnan(S.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(S.AnalysisError, match="2 y values"):
        S.spearman([1, 2, 3], [1, 2])
    with pytest.raises(S.AnalysisError, match="finite"):
        S.spearman([1, 2, float("nan")], [1, 2, 3])


def test_sensitivity_and_flatness_figures(tmp_path):
    model = _cnn()
    var = S.layer_variances(model)
    sens = {n: 0.01 * i for i, n in enumerate(var)}
    _png_ok(AF.sensitivity_figure(sens, var, tmp_path / "sens.png", metric="accuracy", sparsity=0.9))
    with pytest.raises(S.AnalysisError, match="fewer than two"):
        AF.sensitivity_figure({"a": 1.0}, {"a": 1.0}, tmp_path / "x.png")
    prof = {"sgd": ([-1, 0, 1], [2.0, 0.5, 2.2]), "var": ([-1, 0, 1], [1.0, 0.4, 1.1])}
    _png_ok(AF.flatness_figure(prof, tmp_path / "flat.png"))
    with pytest.raises(S.AnalysisError, match="2 losses"):
        AF.flatness_figure({"bad": ([0, 1, 2], [1.0, 2.0])}, tmp_path / "y.png")


def test_user_errors_are_typed():
    empty = nn.Sequential(nn.ReLU())
    with pytest.raises(S.AnalysisError, match="no prunable"):
        S.magnitude_histograms({"x": empty})
    with pytest.raises(S.AnalysisError, match="no prunable"):
        S.layer_sensitivity(empty, lambda m: 0.0, lambda m: None)
    with pytest.raises(ValueError, match="sparsity"):
        S.global_layer_sparsity(_cnn(), [1.5])
