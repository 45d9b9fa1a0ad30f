"""Text tasks: causal language modeling (perplexity) and sequence classification (accuracy).

Models are Hugging Face transformers (varprune.models.hf): they take token ids (or a dict of ``input_ids`` and
``attention_mask``) and return an output with ``.logits``; :meth:`TextTask.forward` hides both differences, so
the training step and the evaluation are the same code as for images.

Language modeling follows the WikiText protocol of the pruning literature (locuslab/wanda ``lib/eval.py``): the
test text is tokenized once, cut into ``floor(n / seq_len)`` non-overlapping windows (data.tokens), and
perplexity is ``exp`` of the mean next-token negative log-likelihood over every predicted token of those
windows, ``seq_len - 1`` per window. Lower is better.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from varprune.device import autocast
from varprune.tasks.base import Task


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output: a tensor as it is, or a transformers output's ``.logits``."""
    return output.logits if hasattr(output, "logits") else output


class TextTask(Task):
    """What both text tasks share: token-id inputs (or dicts of them), no augmentation."""

    def forward(self, model, x):
        return logits_of(model(**x) if isinstance(x, dict) else model(x))

    def augment(self, x, y, generator):
        return x, y


class LanguageModeling(TextTask):
    """Causal language modeling: next-token cross-entropy; perplexity (primary, lower is better) and next-token
    accuracy. A batch is ``(x, x)``: windows of token ids, the targets the same windows shifted by one."""

    name = "language-modeling"
    primary = "perplexity"
    higher_is_better = False
    metric_names = ("perplexity", "next_token_accuracy")
    train_key = "train_next_token_accuracy"

    def loss(self, output, target):
        logits = logits_of(output)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target[:, 1:].reshape(-1))

    def train_hits(self, output, target):
        predicted = logits_of(output).detach()[:, :-1].argmax(-1)
        return (predicted == target[:, 1:]).sum(), target[:, 1:].numel()

    @torch.no_grad()
    def evaluate(self, model, loader, amp="none", reduce=None) -> dict:
        """Perplexity over every predicted token of the loader's windows; one host synchronisation at the end."""
        model.eval()
        # summed negative log-likelihood (float64), predicted tokens, correct predictions
        totals = torch.zeros(3, dtype=torch.float64, device=loader.device)
        for x, y in loader:
            with autocast(x.device, amp):
                logits = self.forward(model, x)[:, :-1]
            flat = logits.reshape(-1, logits.shape[-1]).float()
            targets = y[:, 1:].reshape(-1)
            totals[0] += F.cross_entropy(flat, targets, reduction="sum").double()
            totals[1] += targets.numel()
            totals[2] += (flat.argmax(-1) == targets).sum()
        if reduce is not None:  # every process evaluated its share of the windows
            totals = reduce(totals)
        nll, count, correct = totals.tolist()
        if not count:
            return {k: float("nan") for k in self.metric_names}
        mean = nll / count
        return {
            "perplexity": math.exp(mean) if mean < 700 else math.inf,
            "next_token_accuracy": correct / count,
            "nll": mean,
        }


class TextClassification(TextTask):
    """Sequence classification with an encoder (BERT): cross-entropy, accuracy."""

    name = "text-classification"
    primary = "accuracy"
    metric_names = ("accuracy",)
    train_key = "train_accuracy"

    def loss(self, output, target):
        return F.cross_entropy(logits_of(output).float(), target)

    def train_hits(self, output, target):
        return (logits_of(output).detach().argmax(-1) == target).sum(), target.numel()

    @torch.no_grad()
    def evaluate(self, model, loader, amp="none", reduce=None) -> dict:
        model.eval()
        counts = torch.zeros(2, dtype=torch.long, device=loader.device)  # correct, seen
        for x, y in loader:
            with autocast(y.device, amp):
                counts[0] += (self.forward(model, x).argmax(-1) == y).sum()
            counts[1] += len(y)
        if reduce is not None:
            counts = reduce(counts)
        correct, seen = counts.tolist()
        return {"accuracy": correct / seen if seen else float("nan")}
