"""A one-shot pruning sweep with BatchNorm re-tuning, timed: where the time goes.

ResNet-18 (CIFAR stem, 11.2M prunable weights; random init by default, or
``--weights model.safetensors`` from a run) is pruned globally at 8
sparsities by :func:`varprune.engine.sweep.prune_sweep`, with BNT and evaluation on
Fashion-MNIST. Printed:

* the sweep's wall time and the split prune_sweep reports (pruning, BNT);
* the pruning re-timed with device synchronisation: one sort for the model,
  then mask + apply per sparsity, against the BNT forward time;
* the alternatives for reading 8 masks: the one stable argsort the pruner
  used to do, the pruner as it is (one integer sort of the bit patterns), a
  plain value sort, per-sparsity radix-select (``keep_mask_topk``, what CrAM
  runs every step), ``torch.kthvalue`` and ``torch.quantile`` (which refuses
  inputs over 2^24 elements), interleaved. Every timer synchronises the
  device (``common.sync``) before reading the clock.

Judged figure (issue 4: "the pruning itself takes a small fraction of the BNT
forward time"): (sort + masks + apply for all sparsities) / BNT forward time of
the sweep at the protocol's BNT size (20 batches of 500 per sparsity; on CPU,
where that would take many minutes, projected from the measured BNT images/s;
the fraction at the reduced size actually run is printed too). This benchmark
reads "small" as below 0.10.

On CPU the test set and the BNT batches are reduced (printed); on a GPU the
defaults are the full 10k test set and BNT = 20 batches of 500 (docs/background.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from varprune.data import DeviceLoader, load_dataset, subset
from varprune.engine.sweep import DEFAULT_SPARSITIES, prune_sweep
from varprune.engine.trained import bnt_inputs as bnt_batches
from varprune.tasks import Classification

TASK = Classification(10)
from common import add_device_args, load_average, machine, setup_device, sync

from varprune.models import create_model
from varprune.numerics.pruning import MagnitudePruner, keep_mask_topk
from varprune.numerics.weights import prunable_weights

SMALL_FRACTION = 0.10
PROTOCOL_BNT = (20, 500)  # batches x images: the reference measurement's (docs/background.md), prune's default


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--weights", default=None, help="a model.safetensors from `varprune train` (default: random init)")
    p.add_argument("--test-size", type=int, default=None, help="test images; default 128 on CPU, 10000 on GPU")
    p.add_argument("--bnt-batches", type=int, default=None, help="default 2 on CPU, 20 on GPU")
    p.add_argument("--bnt-batch-size", type=int, default=None, help="default 64 on CPU, 500 on GPU")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 128 on CPU, 500 on GPU")
    p.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--threshold-repeats", type=int, default=None, help="rounds of the threshold comparison")
    add_device_args(p)
    args = p.parse_args(argv)
    device = setup_device(args)
    gpu = device.type == "cuda"
    test_size = args.test_size or (10000 if gpu else 128)
    bnt_n = args.bnt_batches or (20 if gpu else 2)
    bnt_bs = args.bnt_batch_size or (500 if gpu else 64)
    eval_bs = args.eval_batch_size or (500 if gpu else 128)
    amp = args.amp if args.amp != "auto" else ("bf16" if gpu else "none")
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and gpu)
    repeats = args.threshold_repeats or (10 if gpu else 3)

    print("bench_sweep: one-shot global magnitude pruning sweep with BNT, timed")
    print(f"machine   {machine(device)}")
    print(f"load avg  {load_average()} (1/5/15 min, at start)")

    data = load_dataset("fashion-mnist")
    info = data.info
    vx, vy = subset(data.test_x, data.test_y, test_size, salt=1)
    tx, _ = subset(data.train_x, data.train_y, bnt_n * bnt_bs, salt=0)
    test_loader = DeviceLoader(vx, vy, info, eval_bs, train=False, device=device, channels_last=channels_last)
    bnt_inputs = bnt_batches(tx.to(device), bnt_n, bnt_bs, test_loader.normalize)

    torch.manual_seed(0)
    model = create_model(args.model, info.channels, info.num_classes, info.size).to(device)
    if args.weights:
        from varprune.storage.checkpoint import load_weights

        load_weights(args.weights, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    named = prunable_weights(model)
    n = sum(w.numel() for _, w in named)
    sparsities = list(DEFAULT_SPARSITIES)
    print(
        f"sizes     {args.model} ({'random init' if not args.weights else args.weights}), {n:,} prunable weights "
        f"in {len(named)} tensors; {info.channels}x{info.size}x{info.size} Fashion-MNIST; test {len(vx)} images "
        f"(eval batch {eval_bs}); BNT {len(bnt_inputs)} batches of {bnt_bs}; amp {amp}, channels_last "
        f"{channels_last}; sparsities {sparsities}"
    )

    # ---- the sweep as `varprune prune` runs it
    t_sweep, result = timed(lambda: prune_sweep(model, sparsities, TASK, test_loader, bnt_inputs, amp=amp), device)
    tm = result["timing"]
    print(
        f"\nsweep     wall {t_sweep:.2f} s for {len(sparsities)} sparsities (prune_sweep's own split: "
        f"prune {tm['prune_s']:.3f} s, BNT {tm['bnt_s']:.2f} s, the rest = sort + evaluations "
        f"{tm['total_s'] - tm['prune_s'] - tm['bnt_s']:.2f} s)"
    )
    print(
        f"          dense accuracy {100 * result['dense_accuracy']:.2f}%; "
        + ", ".join(f"{r['sparsity']:g}: {100 * r['accuracy_bnt']:.1f}%" for r in result["results"])
        + " after BNT"
    )

    # ---- pruning re-timed with synchronisation, against one BNT pass and one evaluation
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    t_sort, pruner = timed(lambda: MagnitudePruner(model, "global"), device)
    t_masks, t_apply = [], []
    for s in sparsities:
        model.load_state_dict(dense)
        dt, _ = timed(lambda s=s: pruner.masks(s), device)
        t_masks.append(dt)
        model.load_state_dict(dense)
        dt, _ = timed(lambda s=s: pruner.apply(s), device)
        t_apply.append(dt)
    model.load_state_dict(dense)
    from varprune.device import autocast

    def accuracy(model, loader, amp):
        return TASK.evaluate(model, loader, amp)["accuracy"]

    from varprune.numerics.pruning import recalibrate_bn

    def bnt():
        with autocast(device, amp):
            recalibrate_bn(model, bnt_inputs)

    t_bnt1, _ = timed(bnt, device)
    t_eval1, _ = timed(lambda: accuracy(model, test_loader, amp), device)
    model.load_state_dict(dense)
    prune_total = t_sort + sum(t_apply)
    bnt_total = t_bnt1 * len(sparsities)
    print(
        f"\npruning   MagnitudePruner's one sort of {n:,} magnitudes {1e3 * t_sort:.1f} ms; masks + apply per sparsity "
        f"median {1e3 * statistics.median(t_apply):.1f} ms (masks alone {1e3 * statistics.median(t_masks):.1f} ms); "
        f"all {len(sparsities)}: {1e3 * prune_total:.1f} ms"
    )
    print(
        f"forward   one BNT pass ({len(bnt_inputs)} x {bnt_bs}) {1e3 * t_bnt1:.0f} ms, x{len(sparsities)} = "
        f"{bnt_total:.2f} s; one evaluation ({len(vx)} images) {1e3 * t_eval1:.0f} ms"
    )

    # ---- ways to get 8 thresholds from the magnitudes, interleaved
    flat = torch.cat([w.detach().abs().reshape(-1).float() for _, w in named])
    ks = [round(s * n) for s in sparsities]

    def argsort_once():
        order = torch.argsort(flat, stable=True)
        out = []
        for k in ks:
            keep = torch.ones(n, dtype=torch.bool, device=flat.device)
            keep[order[:k]] = False
            out.append(keep)
        return out

    def pruner_once():
        pr = MagnitudePruner(model, "global")
        return [pr.masks(s) for s in sparsities]

    def radix_each():
        return [keep_mask_topk(flat, k) for k in ks]

    def sort_values_once():
        v = torch.sort(flat).values
        return [flat > v[k - 1] for k in ks]

    def int_sort_once():
        # non-negative floats order like their bits read as int32: an integer sort (radix on CPU)
        v = torch.sort(flat.view(torch.int32)).values.view(torch.float32)
        return [flat > v[k - 1] for k in ks]

    def kthvalue_each():
        return [flat > torch.kthvalue(flat, k).values for k in ks]

    def quantile_each():
        return [flat > torch.quantile(flat, s) for s in sparsities]

    base_name = "stable argsort once + 8 masks (old pruner)"
    methods = {
        base_name: argsort_once,
        "MagnitudePruner: int sort once + 8 exact masks": pruner_once,
        "keep_mask_topk per sparsity (8 selections)": radix_each,
        "sort values once + 8 thresholds": sort_values_once,
        "sort int32 bit patterns once + 8 thresholds": int_sort_once,
        "kthvalue per sparsity (8 calls)": kthvalue_each,
    }
    if n <= 2**24:
        methods["quantile per sparsity (8 calls)"] = quantile_each
    results = {k: [] for k in methods}
    for r in range(repeats):
        names = list(methods)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            dt, _ = timed(methods[name], device)
            results[name].append(dt)
    base = statistics.median(results[base_name])
    print(f"\nthresholds for {len(ks)} sparsities over {n:,} magnitudes ({repeats} interleaved rounds, medians):")
    for name, ts in results.items():
        print(f"  {name:<50}{1e3 * statistics.median(ts):>10.1f} ms{statistics.median(ts) / base:>8.2f}x")
    if n > 2**24:
        print(f"  torch.quantile skipped: {n:,} > 2^24 elements, which it refuses")
    print(f"load avg  {load_average()} at end")

    bnt_images = sum(len(b) for b in bnt_inputs)
    per_image = t_bnt1 / bnt_images
    protocol_images = PROTOCOL_BNT[0] * PROTOCOL_BNT[1]
    bnt_protocol = per_image * protocol_images * len(sparsities)
    frac_used = prune_total / bnt_total
    frac_protocol = prune_total / bnt_protocol
    at_protocol = bnt_images == protocol_images
    print(f"\nfraction  pruning / BNT forward with the BNT used here ({len(bnt_inputs)}x{bnt_bs}): {frac_used:.4f}")
    print(
        f"          pruning / BNT forward at the protocol's BNT ({PROTOCOL_BNT[0]}x{PROTOCOL_BNT[1]} per sparsity, "
        f"{'measured' if at_protocol else f'projected from the measured {1 / per_image:.0f} images/s'}): "
        f"{frac_protocol:.4f}"
    )
    verdict = "PASS" if frac_protocol < SMALL_FRACTION else "FAIL"
    print(
        f"\nJUDGED  pruning (sort + {len(sparsities)} x masks+apply) / BNT forward time at the protocol's BNT size "
        f"= {frac_protocol:.4f}  target < {SMALL_FRACTION} (this benchmark's reading of 'a small fraction')  "
        f"{verdict}"
    )
    print(
        f"        full {len(sparsities)}-sparsity sweep with BNT on {args.model}: {t_sweep:.2f} s wall "
        f"(test {len(vx)}, BNT {len(bnt_inputs)}x{bnt_bs}, {device.type})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
