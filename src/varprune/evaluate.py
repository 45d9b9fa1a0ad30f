"""Accuracy, and the one-shot pruning sweep with BatchNorm re-tuning."""
from __future__ import annotations

import copy
import time
from typing import Iterable

import torch
from torch import nn

from .device import autocast
from .pruning import MagnitudePruner, check_sparsity, realised_sparsity, recalibrate_bn

DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, amp: str = "none") -> float:
    """Top-1 accuracy as a fraction; one host synchronisation at the end."""
    model.eval()
    correct, seen = None, 0
    for x, y in loader:
        with autocast(x.device, amp):
            hits = (model(x).argmax(1) == y).sum()
        correct = hits if correct is None else correct + hits
        seen += len(y)
    return float(correct) / seen if seen else float("nan")


def bnt_batches(images: torch.Tensor, batches: int, batch_size: int, normalize) -> list[torch.Tensor]:
    """The re-tuning batches: the first ``batches * batch_size`` training images
    (unaugmented; the caller passes a deterministic subset), normalised."""
    n = min(len(images), batches * batch_size)
    return [normalize(images[i:i + batch_size]) for i in range(0, n, batch_size)]


def prune_sweep(model: nn.Module, sparsities: Iterable[float], test_loader, bnt_inputs: list[torch.Tensor],
                scope: str = "global", exclude: Iterable[str] = (), amp: str = "none", progress=None) -> dict:
    """Evaluate ``model`` pruned one-shot at every sparsity, before and after BNT.

    The model is restored to its dense state afterwards. Returns the
    ``prune.json`` document: dense accuracy and one result per sparsity.
    """
    sparsities = [check_sparsity(s) for s in sparsities]
    dense_state = copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    dense = accuracy(model, test_loader, amp)
    pruner = MagnitudePruner(model, scope, exclude)  # one sort for every sparsity
    results, prune_time, bnt_time = [], 0.0, 0.0
    try:
        for s in sparsities:
            model.load_state_dict(dense_state)
            t = time.perf_counter()
            masks = pruner.apply(s)
            prune_time += time.perf_counter() - t
            acc = accuracy(model, test_loader, amp)
            t = time.perf_counter()
            with autocast(bnt_inputs[0].device, amp) if bnt_inputs else torch.no_grad():
                recalibrate_bn(model, bnt_inputs)
            bnt_time += time.perf_counter() - t
            acc_bnt = accuracy(model, test_loader, amp)
            results.append({"sparsity": s, "realised_sparsity": realised_sparsity(masks),
                            "accuracy": acc, "accuracy_bnt": acc_bnt})
            if progress is not None:
                progress(s, acc, acc_bnt)
    finally:
        model.load_state_dict(dense_state)
    return {"dense_accuracy": dense, "scope": scope, "exclude": list(exclude), "results": results,
            "timing": {"total_s": time.perf_counter() - t0, "prune_s": prune_time, "bnt_s": bnt_time}}
