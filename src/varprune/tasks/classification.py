"""Image classification: cross-entropy, top-1 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from varprune.device import autocast
from varprune.tasks.augment import crop_flip
from varprune.tasks.base import Task


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
        if reduce is not None:  # a process with an empty share still takes part
            counts = torch.zeros(2, dtype=torch.long, device=loader.device)
            counts[0] = 0 if correct is None else correct
            counts[1] = seen
            correct, seen = reduce(counts).tolist()
        n_correct = 0 if correct is None else int(correct)
        return {"accuracy": n_correct / seen if seen else float("nan")}
