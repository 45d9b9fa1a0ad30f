"""Semantic segmentation: cross-entropy plus soft Dice; mean foreground Dice and the confusion-matrix metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from varprune.device import autocast
from varprune.numerics.metrics import SegConfusion
from varprune.tasks.augment import crop_flip
from varprune.tasks.base import Task


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
        model.eval()
        conf = SegConfusion(self.num_classes, loader.device) if reduce is not None else None
        for x, y in loader:
            if conf is None:
                conf = SegConfusion(self.num_classes, y.device)
            with autocast(x.device, amp):
                pred = model(x).argmax(1)
            conf.update(pred, y)
        if reduce is not None:
            assert conf is not None
            reduce(conf.counts)
            if int(conf.counts.sum()) == 0:
                conf = None
        if conf is None:
            return {k: float("nan") for k in self.metric_names}
        return conf.result()
