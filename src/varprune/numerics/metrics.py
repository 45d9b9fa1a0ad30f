"""Evaluation metrics: classification accuracy, segmentation Dice, IoU, pixel accuracy.

Segmentation scores follow MONAI's DiceMetric (include_background=False): per class, Dice and IoU are
computed from the confusion matrix pooled over the whole evaluated set (every
pixel of every image counted together; *not* a per-image score averaged over
images), then averaged over the foreground classes (background, class 0, is
left out unless ``include_background=True``).

Empty classes. A class that appears in neither the prediction nor the target
anywhere in the set has no defined Dice (0/0) and is left out of the mean
(``exclude_empty="both"``, the default). A class absent from the target but
predicted somewhere scores Dice 0 and counts. MONAI's ``DiceMetric`` with
``ignore_empty=True`` instead leaves out every class absent from the target,
predicted or not; ``exclude_empty="target"`` reproduces that rule. If no class
remains, the mean is NaN.

`SegConfusion` and `ClassificationCounter` accumulate on the
device: ``update`` never synchronises with the host; ``result`` reads the
counts once. Labels out of range are counted in a separate bin and reported by
``result`` as a `MetricError`. For several processes, all-reduce (sum)
``counter.counts`` before ``result()``.
"""

from __future__ import annotations

import math

import torch

EXCLUDE_EMPTY = ("both", "target")


class MetricError(ValueError):
    """Inputs to a metric have the wrong shape, type or label range."""


def _as_labels(x, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise MetricError(f"{what} must be a tensor or array of integer labels ({exc})") from None
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise MetricError(
            f"{what} must hold integer class labels, not {x.dtype}; take logits.argmax(1) for predictions"
        )
    return x


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise MetricError(f"num_classes must be a positive integer; got {num_classes!r}")
    return num_classes


def _check_exclude(exclude_empty: str) -> None:
    if exclude_empty not in EXCLUDE_EMPTY:
        raise MetricError(f"exclude_empty must be 'both' or 'target', not {exclude_empty!r}")


def confusion_matrix(pred, target, num_classes: int) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts: entry ``[t, p]`` counts pixels of target ``t`` predicted ``p``.

    ``pred`` and ``target`` are integer label maps of the same shape (any number
    of dims), values in ``[0, num_classes)``; otherwise `MetricError`.
    The matrix is on the inputs' device.
    """
    num_classes = _check_num_classes(num_classes)
    pred, target = _as_labels(pred, "pred"), _as_labels(target, "target")
    if pred.shape != target.shape:
        raise MetricError(
            f"pred and target must have the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p, t = pred.reshape(-1).long(), target.reshape(-1).long()
    for name, v in (("pred", p), ("target", t)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise MetricError(f"{name} labels must lie in [0, {num_classes}); found {int(v.min())}..{int(v.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def scores_from_confusion(matrix: torch.Tensor, include_background: bool = False, exclude_empty: str = "both") -> dict:
    """Dice, IoU and pixel accuracy from a pooled confusion matrix (rows: target, columns: prediction).

    Returns ``{"dice", "dice_per_class", "iou", "iou_per_class", "pixel_accuracy"}``.
    Per-class lists are indexed by class id (background included) and hold
    ``None`` for a class left out under ``exclude_empty``; ``dice`` and ``iou``
    are the means over the classes kept (class 0 dropped unless
    ``include_background``), NaN if none is kept; ``pixel_accuracy`` is NaN for
    an empty matrix. Computed in float64 on the host.
    """
    _check_exclude(exclude_empty)
    cm = matrix.detach().to("cpu", torch.float64)
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise MetricError(f"confusion matrix must be square; got shape {tuple(cm.shape)}")
    tp = cm.diagonal()
    in_target = cm.sum(1)  # tp + fn
    in_pred = cm.sum(0)  # tp + fp
    dice_den = in_target + in_pred  # 2tp + fp + fn
    union = dice_den - tp  # tp + fp + fn
    kept = (in_target > 0) if exclude_empty == "target" else (dice_den > 0)
    dice_pc: list[float | None] = []
    iou_pc: list[float | None] = []
    for c in range(cm.shape[0]):
        if kept[c]:
            dice_pc.append(float(2 * tp[c] / dice_den[c]))
            iou_pc.append(float(tp[c] / union[c]))
        else:
            dice_pc.append(None)
            iou_pc.append(None)
    first = 0 if include_background else 1
    dice_fg = [d for d in dice_pc[first:] if d is not None]
    iou_fg = [v for v in iou_pc[first:] if v is not None]
    total = float(cm.sum())
    return {
        "dice": math.fsum(dice_fg) / len(dice_fg) if dice_fg else float("nan"),
        "dice_per_class": dice_pc,
        "iou": math.fsum(iou_fg) / len(iou_fg) if iou_fg else float("nan"),
        "iou_per_class": iou_pc,
        "pixel_accuracy": float(tp.sum()) / total if total else float("nan"),
    }


def dice_score(pred, target, num_classes: int, include_background: bool = False, exclude_empty: str = "both") -> float:
    """Mean Dice over classes, each class's Dice pooled over all of ``pred``/``target``.

    ``pred`` and ``target``: integer label maps of one shape, e.g. ``(N, H, W)``
    for N images, values in ``[0, num_classes)`` (tensors or arrays). For each
    class c, Dice = 2 |P_c & T_c| / (|P_c| + |T_c|) counted over every element
    of the input at once. The mean leaves out background (class 0) unless
    ``include_background`` and classes left out by ``exclude_empty`` (see the
    module docstring); it is NaN when no class remains. Bad shapes, float
    labels or labels out of range raise `MetricError` (a ValueError).
    """
    return scores_from_confusion(confusion_matrix(pred, target, num_classes), include_background, exclude_empty)["dice"]


class SegConfusion:
    """Confusion matrix of a segmentation evaluation, accumulated on ``device``.

    ``update(pred, target)`` takes predicted labels of the target's shape, or
    logits with the class dimension at dim 1 (``(N, C, ...)`` for a target
    ``(N, ...)``, reduced by argmax); it adds to an int64 count tensor without
    any host synchronisation. ``result()`` syncs once and returns
    `scores_from_confusion`'s dict (``dice`` is the primary metric).
    ``counts`` holds ``num_classes**2 + 1`` int64 counts (the last one counts
    pixels whose labels were out of range; ``result`` raises if it is not 0).
    """

    def __init__(self, num_classes: int, device="cpu", include_background: bool = False, exclude_empty: str = "both"):
        self.num_classes = _check_num_classes(num_classes)
        _check_exclude(exclude_empty)
        self.include_background = include_background
        self.exclude_empty = exclude_empty
        self.counts = torch.zeros(num_classes**2 + 1, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def matrix(self) -> torch.Tensor:
        """The ``C x C`` confusion matrix (a view; rows target, columns prediction)."""
        c = self.num_classes
        return self.counts[: c * c].view(c, c)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise MetricError("SegConfusion.update takes tensors (pred, target)")
        _as_labels(target, "target")
        if pred.dtype.is_floating_point:
            if pred.dim() != target.dim() + 1 or pred.shape[1] != self.num_classes:
                raise MetricError(
                    f"logits must have shape (N, {self.num_classes}, ...) for a target of shape "
                    f"{tuple(target.shape)}; got {tuple(pred.shape)}"
                )
            pred = pred.argmax(1)
        _as_labels(pred, "pred")
        if pred.shape != target.shape:
            raise MetricError(
                f"pred and target must have the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        c = self.num_classes
        p = pred.reshape(-1).to(self.counts.device, torch.int64)
        t = target.reshape(-1).to(self.counts.device, torch.int64)
        valid = (p >= 0) & (p < c) & (t >= 0) & (t < c)
        idx = torch.where(valid, t * c + p, torch.full_like(p, c * c))
        # index_add_ rather than bincount: bincount reads the max on the host (a sync on CUDA)
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    def result(self) -> dict:
        counts = self.counts.cpu()
        bad = int(counts[-1])
        if bad:
            raise MetricError(
                f"{bad} pixels had labels outside [0, {self.num_classes}); "
                f"check num_classes ({self.num_classes}) against the dataset's labels"
            )
        c = self.num_classes
        return scores_from_confusion(counts[: c * c].view(c, c), self.include_background, self.exclude_empty)


class ClassificationCounter:
    """Top-1 accuracy accumulated on ``device`` without host syncs per batch.

    ``update(output, target)``: ``output`` is logits ``(N, C)`` (argmax over
    dim 1) or predicted labels ``(N,)``; ``target`` labels ``(N,)``.
    ``result()`` -> ``{"accuracy": fraction correct}`` (NaN if nothing was
    counted). ``counts`` is ``[correct, seen]`` (int64) for an all-reduce.
    """

    def __init__(self, device="cpu"):
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise MetricError("ClassificationCounter.update takes tensors (output, target)")
        _as_labels(target, "target")
        if target.dim() != 1:
            raise MetricError(f"target must be labels of shape (N,); got {tuple(target.shape)}")
        if output.dim() == 2:
            output = output.argmax(1)
        _as_labels(output, "predicted labels")
        if output.shape != target.shape:
            raise MetricError(
                f"output must be logits (N, C) or labels (N,) for N={target.shape[0]}; got {tuple(output.shape)}"
            )
        hits = (output.to(self.counts.device) == target.to(self.counts.device)).sum()
        self.counts[0] += hits
        self.counts[1] += target.shape[0]

    def result(self) -> dict:
        correct, seen = (int(v) for v in self.counts.cpu())
        return {"accuracy": correct / seen if seen else float("nan")}
