"""Segmentation and classification metrics against float64 numpy and MONAI.

What is compared with MONAI. ``monai.metrics.DiceMetric`` scores each image
(batch item) and class separately and then averages over images; varprune pools
every pixel of the set per class first (METHOD.md section 7). Feeding MONAI the
whole set as ONE image (the N images stacked along the height axis) makes its
per-image score the pooled score, so the two must agree class by class.
MONAI's empty rule differs: with ``ignore_empty=True`` it leaves out a class
absent from the *target* even if it was predicted; with ``ignore_empty=False``
it scores a class absent from both as 1.0 and one absent only from the target
as 0.0. varprune's default leaves out classes absent from both and scores the
rest like MONAI's ``ignore_empty=False``; ``exclude_empty="target"`` is MONAI's
``ignore_empty=True``. Both correspondences are tested below.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from varprune.numerics.metrics import (
    ClassificationCounter,
    MetricError,
    SegConfusion,
    confusion_matrix,
    dice_score,
    scores_from_confusion,
)

monai_metrics = pytest.importorskip("monai.metrics")


def numpy_reference(pred, target, num_classes, include_background=False, exclude_empty="both"):
    """Per-class Dice/IoU by boolean masks in float64, no confusion matrix."""
    pred, target = np.asarray(pred), np.asarray(target)
    dice, iou = [], []
    for c in range(num_classes):
        p, t = pred == c, target == c
        inter, sp, st_ = float((p & t).sum()), float(p.sum()), float(t.sum())
        keep = st_ > 0 if exclude_empty == "target" else (sp + st_) > 0
        dice.append(2 * inter / (sp + st_) if keep else None)
        iou.append(inter / float((p | t).sum()) if keep else None)
    first = 0 if include_background else 1
    d = [x for x in dice[first:] if x is not None]
    i = [x for x in iou[first:] if x is not None]
    return {
        "dice": np.mean(d) if d else math.nan,
        "iou": np.mean(i) if i else math.nan,
        "dice_per_class": dice,
        "iou_per_class": iou,
        "pixel_accuracy": float((pred == target).mean()) if pred.size else math.nan,
    }


def assert_scores_equal(got, want):
    for key in ("dice", "iou", "pixel_accuracy"):
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    for key in ("dice_per_class", "iou_per_class"):
        assert [x is None for x in got[key]] == [x is None for x in want[key]], key
        assert [x for x in got[key] if x is not None] == pytest.approx(
            [x for x in want[key] if x is not None], rel=1e-12, abs=1e-12
        )


def monai_pooled(pred, target, num_classes, ignore_empty, reduction="none"):
    """MONAI DiceMetric on the set stacked into one image: (N, H, W) -> (1, C, N*H, W) one-hot."""

    def one_image(x):
        x = torch.as_tensor(x).reshape(1, -1, x.shape[-1])
        return torch.nn.functional.one_hot(x.long(), num_classes).permute(0, 3, 1, 2).float()

    metric = monai_metrics.DiceMetric(include_background=False, reduction=reduction, ignore_empty=ignore_empty)
    metric(one_image(pred), one_image(target))
    return metric.aggregate()


def random_maps(seed, n=3, h=7, w=5, num_classes=4, present=None):
    g = np.random.default_rng(seed)
    labels = np.arange(num_classes) if present is None else np.asarray(present)
    return g.choice(labels, size=(n, h, w)), g.choice(labels, size=(n, h, w))


CASES = {
    "random": dict(seed=0),
    "class 3 absent from both": dict(seed=1, present=[0, 1, 2]),
    "only background and class 2": dict(seed=2, present=[0, 2]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("exclude_empty", ["both", "target"])
def test_scores_match_numpy(case, include_background, exclude_empty):
    pred, target = random_maps(**CASES[case])
    want = numpy_reference(pred, target, 4, include_background, exclude_empty)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 4)
    assert_scores_equal(scores_from_confusion(cm, include_background, exclude_empty), want)
    assert dice_score(pred, target, 4, include_background, exclude_empty) == pytest.approx(want["dice"], rel=1e-12)


@given(st.integers(1, 5), st.integers(0, 2**32 - 1), st.integers(1, 40))
@settings(max_examples=60, deadline=None)
def test_dice_matches_numpy_property(num_classes, seed, size):
    g = np.random.default_rng(seed)
    k = g.integers(1, num_classes + 1)  # use only the first k labels, so some classes may be absent
    pred, target = g.integers(0, k, size), g.integers(0, k, size)
    for exclude_empty in ("both", "target"):
        want = numpy_reference(pred, target, num_classes, False, exclude_empty)
        got = scores_from_confusion(confusion_matrix(pred, target, num_classes), False, exclude_empty)
        assert_scores_equal(got, want)


def test_predicted_class_absent_from_target_counts_as_zero():
    target = np.zeros((1, 4, 4), dtype=np.int64)
    target[0, :2] = 1  # class 1 present
    pred = target.copy()
    pred[0, 3, 3] = 2  # class 2 only predicted
    assert dice_score(pred, target, 3) == pytest.approx((1.0 + 0.0) / 2)
    assert dice_score(pred, target, 3, exclude_empty="target") == pytest.approx(1.0)


@pytest.mark.parametrize("case", list(CASES) + ["predicted but absent from target"])
def test_pooled_dice_matches_monai_on_the_stacked_set(case):
    if case == "predicted but absent from target":
        pred, target = random_maps(seed=3, present=[0, 1, 2, 3])
        target[target == 3] = 0  # class 3 predicted, never in the target
    else:
        pred, target = random_maps(**CASES[case])
    ours = scores_from_confusion(confusion_matrix(pred, target, 4))
    # ignore_empty=False: per-class scores agree wherever varprune keeps the class; classes absent
    # from both are 1.0 in MONAI and left out by varprune
    per_class = monai_pooled(pred, target, 4, ignore_empty=False)[0].double().numpy()
    for c in range(1, 4):
        if ours["dice_per_class"][c] is None:
            assert not (pred == c).any() and not (target == c).any()
            assert per_class[c - 1] == 1.0
        else:
            assert ours["dice_per_class"][c] == pytest.approx(per_class[c - 1], rel=1e-6)
    # ignore_empty=True with MONAI's NaN-skipping mean is exactly exclude_empty="target"
    monai_mean = float(monai_pooled(pred, target, 4, ignore_empty=True, reduction="mean"))
    assert dice_score(pred, target, 4, exclude_empty="target") == pytest.approx(monai_mean, rel=1e-6)


def test_pooling_over_the_set_is_not_a_mean_of_per_image_scores():
    # image 0: one class-1 pixel, found (Dice 1); image 1: nine class-1 pixels, all missed (Dice 0)
    target = np.zeros((2, 3, 3), dtype=np.int64)
    target[0, 0, 0] = 1
    target[1] = 1
    pred = np.zeros_like(target)
    pred[0, 0, 0] = 1
    assert dice_score(pred, target, 2) == pytest.approx(2 * 1 / (1 + 10))
    onehot = lambda x: torch.nn.functional.one_hot(torch.from_numpy(x), 2).permute(0, 3, 1, 2).float()  # noqa: E731
    per_image = monai_metrics.DiceMetric(include_background=False, reduction="mean")
    per_image(onehot(pred), onehot(target))
    per_image_mean = float(per_image.aggregate())
    assert per_image_mean == pytest.approx(0.5)
    assert float(monai_pooled(pred, target, 2, ignore_empty=True, reduction="mean")) == pytest.approx(2 / 11)


def test_all_background_gives_nan_dice_and_full_accuracy():
    zeros = torch.zeros(2, 5, 5, dtype=torch.int64)
    out = scores_from_confusion(confusion_matrix(zeros, zeros, 3))
    assert math.isnan(out["dice"]) and math.isnan(out["iou"])
    assert out["pixel_accuracy"] == 1.0 and out["dice_per_class"] == [1.0, None, None]
    assert scores_from_confusion(confusion_matrix(zeros, zeros, 3), include_background=True)["dice"] == 1.0


def test_seg_confusion_accumulates_batches_like_the_whole_set():
    pred, target = random_maps(seed=4, n=6, num_classes=5)
    logits = torch.randn(6, 5, 7, 5, dtype=torch.float64)
    # logits whose argmax is pred
    logits.scatter_(1, torch.from_numpy(pred)[:, None], 10.0)
    acc = SegConfusion(5, include_background=False)
    acc.update(logits[:2], torch.from_numpy(target[:2]).to(torch.uint8))  # logits and uint8 targets
    acc.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))  # labels
    assert torch.equal(acc.matrix, confusion_matrix(pred, target, 5))
    assert_scores_equal(acc.result(), numpy_reference(pred, target, 5))
    acc.reset()
    assert int(acc.counts.sum()) == 0


def test_seg_confusion_reports_labels_out_of_range_at_result():
    acc = SegConfusion(3)
    acc.update(torch.tensor([[0, 1, 5]]), torch.tensor([[0, 1, 2]]))
    acc.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, -1, 2]]))
    with pytest.raises(MetricError, match="2 pixels had labels outside"):
        acc.result()


@pytest.mark.parametrize(
    "pred,target,num_classes,match",
    [
        (np.zeros((2, 3)), np.zeros((2, 3), int), 2, "integer class labels, not torch.float64"),
        (np.zeros((2, 3), int), np.zeros((3, 2), int), 2, "same shape"),
        (np.full((2, 3), 2), np.zeros((2, 3), int), 2, r"pred labels must lie in \[0, 2\)"),
        (np.zeros((2, 3), int), np.full((2, 3), -1), 2, r"target labels must lie in \[0, 2\)"),
        (np.zeros((2, 3), int), np.zeros((2, 3), int), 0, "num_classes must be a positive integer"),
    ],
)
def test_dice_score_rejects_bad_inputs(pred, target, num_classes, match):
    with pytest.raises(MetricError, match=match):
        dice_score(pred, target, num_classes)
    assert issubclass(MetricError, ValueError)


def test_seg_confusion_rejects_bad_shapes():
    acc = SegConfusion(3)
    with pytest.raises(MetricError, match=r"logits must have shape \(N, 3, ...\)"):
        acc.update(torch.randn(2, 4, 5, 5), torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(MetricError, match="same shape"):
        acc.update(torch.zeros(2, 5, 4, dtype=torch.long), torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(MetricError, match="exclude_empty"):
        SegConfusion(3, exclude_empty="pred")


def test_classification_counter_matches_numpy():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(n, 7, generator=g) for n in (5, 9, 1)]
    targets = [torch.randint(0, 7, (len(x),), generator=g) for x in logits]
    counter = ClassificationCounter()
    counter.update(logits[0], targets[0])
    counter.update(logits[1].argmax(1), targets[1])  # labels accepted too
    counter.update(logits[2], targets[2])
    pred = np.concatenate([x.numpy().argmax(1) for x in logits])
    want = float((pred == np.concatenate([t.numpy() for t in targets])).mean())
    assert counter.result()["accuracy"] == pytest.approx(want, rel=1e-12)
    assert math.isnan(ClassificationCounter().result()["accuracy"])
    with pytest.raises(MetricError, match=r"logits \(N, C\) or labels \(N,\)"):
        counter.update(torch.zeros(3, dtype=torch.long), targets[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_updates_do_not_synchronise_on_cuda():
    seg, cls = SegConfusion(4, "cuda"), ClassificationCounter("cuda")
    logits = torch.randn(2, 4, 8, 8, device="cuda")
    target = torch.randint(0, 4, (2, 8, 8), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seg.update(logits, target)
        cls.update(logits[:, :, 0, 0], target[:, 0, 0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = confusion_matrix(logits.argmax(1).cpu(), target.cpu(), 4)
    assert torch.equal(seg.matrix.cpu(), want)
