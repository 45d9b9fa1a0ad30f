"""Instruction tuning: a causal LM trained and measured on the response tokens only.

A batch (data.instructtokens) is ``({"input_ids", "attention_mask"}, labels)``: (B, L) each, right-padded, the
labels the token ids at response positions (the end-of-sequence token included) and -100 at prompt and padding
positions. Position t's logits predict token t + 1, so the loss is the cross-entropy of ``logits[:, :-1]``
against ``labels[:, 1:]`` over the positions that are not -100, averaged over the batch's response tokens
(Alpaca-LoRA's and LLM-Adapters' ``train_on_inputs=False``).

The test metric is the perplexity of the responses: ``exp`` of the mean negative log-likelihood of every response
token of the test set (summed in float64 over the whole set, not averaged per batch or example), so it does not
depend on the batching. Lower is better; it is the primary metric of the pruning sweep.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from varprune.device import autocast
from varprune.tasks.text import TextTask, logits_of

IGNORE_INDEX = -100


class InstructionTuning(TextTask):
    """Response-only next-token cross-entropy; response perplexity (primary, lower is better) and the response's
    next-token accuracy."""

    name = "instruction-tuning"
    primary = "perplexity"
    higher_is_better = False
    metric_names = ("perplexity", "next_token_accuracy")
    train_key = "train_next_token_accuracy"

    def loss(self, output, target):
        logits = logits_of(output)[:, :-1]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )

    def train_hits(self, output, target):
        targets = target[:, 1:]
        scored = targets != IGNORE_INDEX
        predicted = logits_of(output).detach()[:, :-1].argmax(-1)
        return ((predicted == targets) & scored).sum(), scored.sum()

    @torch.no_grad()
    def evaluate(self, model, loader, amp="none", reduce=None) -> dict:
        """Perplexity over every response token of the loader's examples; one host synchronisation at the end."""
        model.eval()
        # summed negative log-likelihood (float64), response tokens, correct predictions
        totals = torch.zeros(3, dtype=torch.float64, device=loader.device)
        for x, y in loader:
            with autocast(y.device, amp):
                logits = self.forward(model, x)[:, :-1]
            flat = logits.reshape(-1, logits.shape[-1]).float()
            targets = y[:, 1:].reshape(-1)
            scored = targets != IGNORE_INDEX
            nll = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="none")
            totals[0] += nll.double().sum()
            totals[1] += scored.sum()
            totals[2] += ((flat.argmax(-1) == targets) & scored).sum()
        if reduce is not None:  # every process evaluated its share of the examples
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
