"""The task interface: what differs between classification, segmentation and language modeling.

The training step, evaluation, the pruning sweep, reports, studies and the
demo are written once against this interface:

* ``forward(model, x)``: the model's output for a batch (text tasks unpack
  dict inputs and read a transformers output's ``.logits``);
* ``loss(output, target)``: the training loss (cross-entropy; cross-entropy
  plus soft Dice for segmentation; next-token cross-entropy for language
  modeling);
* ``augment(x, y, generator)``: one random draw applied to the input and, for
  segmentation, to the mask (the same crop and the same flip);
* ``train_hits(output, target) -> (hits, count)``: device tensors summed over
  an epoch for the training metric, without host synchronisation;
* ``evaluate(model, loader, amp, reduce=None) -> dict``: every metric, the
  primary one under ``primary``, whose direction ``higher_is_better`` says
  (False for perplexity: everything that ranks results respects it); ``reduce``
  sums a tensor of counts over data-parallel processes, each of which
  evaluated its share of the set (distributed.sum_);
* ``metric_names``: the scalar metrics, primary first, as keys of prune.json.

Adding a task means one class here and a ``task=`` in the datasets it reads.
"""

from __future__ import annotations

import torch
from torch import nn


class Task:
    name = "?"
    primary = "?"
    higher_is_better = True  # the primary metric's direction: every ranking and "best" respects it
    metric_names: tuple[str, ...] = ()
    train_key = "?"

    def __init__(self, num_classes: int, crop_pad: int = 0, flip: bool = False):
        self.num_classes = int(num_classes)
        self.crop_pad = crop_pad
        self.flip = flip

    def forward(self, model: nn.Module, x):
        """The model's output for input batch ``x``."""
        return model(x)

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

    def better(self, a: float, b: float) -> bool:
        """Is primary-metric value ``a`` better than ``b``?"""
        return a > b if self.higher_is_better else a < b
