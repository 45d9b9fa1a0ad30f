"""Tasks: what differs between classification and segmentation, in one place.

The training step, evaluation, the pruning sweep, reports, studies and the
demo are written once against this interface:

* ``loss(output, target)``: the training loss (cross-entropy; cross-entropy
  plus soft Dice for segmentation);
* ``augment(x, y, generator)``: one random draw applied to the input and, for
  segmentation, to the mask (the same crop and the same flip);
* ``train_hits(output, target) -> (hits, count)``: device tensors summed over
  an epoch for the training metric, without host synchronisation;
* ``evaluate(model, loader, amp, reduce=None) -> dict``: every metric, the
  primary one under ``primary`` (higher is better for both tasks); ``reduce``
  sums a tensor of counts over data-parallel processes, each of which
  evaluated its share of the set (distributed.sum_);
* ``metric_names``: the scalar metrics, primary first, as keys of prune.json.

Adding a task means one class here and a ``task=`` in the datasets it reads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .device import autocast


def _shift_crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image of ``x`` (B, C, H, W) zero-padded by ``pad`` and cropped back at offset (dy, dx)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    return xp[batch, chans, rows, cols]


def crop_flip(x: torch.Tensor, y: torch.Tensor | None, pad: int, flip: bool, generator: torch.Generator):
    """Random shift-crop (zero padding ``pad``) and horizontal flip, one draw per image.

    ``y`` is a label map (B, H, W) that receives exactly the same crop and
    flip as ``x`` (padding becomes background, class 0), or None. Draw order:
    row offsets, column offsets, flips: the same random stream whether or not
    a mask comes along.
    """
    b = x.shape[0]
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        x = _shift_crop(x, dy, dx, pad)
        if y is not None:
            y = _shift_crop(y[:, None], dy, dx, pad)[:, 0]
    if flip:
        f = torch.rand(b, device=x.device, generator=generator) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(3), x)
        if y is not None:
            y = torch.where(f[:, None, None], y.flip(2), y)
    return x, y


class Task:
    name = "?"
    primary = "?"
    metric_names: tuple[str, ...] = ()
    train_key = "?"

    def __init__(self, num_classes: int, crop_pad: int = 0, flip: bool = False):
        self.num_classes = int(num_classes)
        self.crop_pad = crop_pad
        self.flip = flip

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def augment(self, x, y, generator):
        raise NotImplementedError

    def train_hits(self, output, target):
        hits = (output.detach().argmax(1) == target).sum()
        return hits, target.numel()

    def evaluate(self, model: nn.Module, loader, amp: str = "none", reduce=None) -> dict:
        raise NotImplementedError

    def primary_of(self, metrics: dict) -> float:
        return metrics[self.primary]


class Classification(Task):
    """Image classification: cross-entropy, top-1 accuracy."""
    name = "classification"
    primary = "accuracy"
    metric_names = ("accuracy",)
    train_key = "train_accuracy"

    def loss(self, output, target):
        return F.cross_entropy(output, target)

    def augment(self, x, y, generator):
        return crop_flip(x, None, self.crop_pad, self.flip, generator)[0], y

    @torch.no_grad()
    def evaluate(self, model, loader, amp="none", reduce=None) -> dict:
        """Top-1 accuracy as a fraction; one host synchronisation at the end."""
        model.eval()
        correct, seen = None, 0
        for x, y in loader:
            with autocast(x.device, amp):
                hits = (model(x).argmax(1) == y).sum()
            correct = hits if correct is None else correct + hits
            seen += len(y)
        if reduce is not None:   # a process with an empty share still takes part
            counts = torch.zeros(2, dtype=torch.long, device=loader.device)
            counts[0] = 0 if correct is None else correct
            counts[1] = seen
            correct, seen = reduce(counts).tolist()
        return {"accuracy": float(correct) / seen if seen else float("nan")}


class Segmentation(Task):
    """Semantic segmentation: cross-entropy plus soft Dice; mean foreground Dice.

    The soft Dice term is pooled over the batch (one Dice per foreground class
    over all pixels of the batch, then the mean over classes), the usual DiceCE
    of U-Net training. Evaluation pools the confusion matrix over the whole test
    set (``metrics.SegConfusion``): Dice, IoU per foreground class, classes
    absent from both prediction and ground truth left out of the mean.
    """
    name = "segmentation"
    primary = "dice"
    metric_names = ("dice", "iou", "pixel_accuracy")
    train_key = "train_pixel_accuracy"

    def loss(self, output, target):
        logits = output.float()
        ce = F.cross_entropy(logits, target)
        probs = logits.softmax(1)[:, 1:]
        onehot = F.one_hot(target, self.num_classes).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)
        denom = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + 1e-5) / (denom + 1e-5)
        return ce + (1 - dice.mean())

    def augment(self, x, y, generator):
        return crop_flip(x, y, self.crop_pad, self.flip, generator)

    @torch.no_grad()
    def evaluate(self, model, loader, amp="none", reduce=None) -> dict:
        from .metrics import SegConfusion
        model.eval()
        conf = SegConfusion(self.num_classes, loader.device) if reduce is not None else None
        for x, y in loader:
            if conf is None:
                conf = SegConfusion(self.num_classes, y.device)
            with autocast(x.device, amp):
                pred = model(x).argmax(1)
            conf.update(pred, y)
        if reduce is not None:
            reduce(conf.counts)
            if int(conf.counts.sum()) == 0:
                conf = None
        if conf is None:
            return {k: float("nan") for k in self.metric_names}
        return conf.result()


TASKS = {"classification": Classification, "segmentation": Segmentation}


def task_for(info) -> Task:
    """The task of a dataset (its ``DatasetInfo``)."""
    return TASKS[info.task](info.num_classes, info.crop_pad, info.flip)
