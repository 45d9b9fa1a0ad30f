"""Training-step time of every method relative to SGD, measured side by side.

Every method runs the training loop's own step (``loop.make_train_step``) on
the same model and batch; the methods take turns in rounds (A B C ... A B C),
so a load change on a shared machine hits all of them alike. Prints the median
step time per method and its ratio to SGD, then the per-step top-k CrAM runs
(``keep_mask_topk`` over the model's prunable weights) against the stable
argsort it replaced.

Judged (issue 10): the CrAM+ step at most 2.4x the SGD step on the MLP and 2.2x
on resnet20, on CPU (the two passes alone are about 2.0x).

    python benchmarks/bench_methods.py                       # CPU: resnet20, batch 128, 28 px
    python benchmarks/bench_methods.py --device cuda         # GPU: resnet18, batch 256, 32 px, bf16
    python benchmarks/bench_methods.py --model mlp --methods sgd,sam,cram,cram+
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch
from common import load_average, machine

from varprune.device import resolve_amp, resolve_device
from varprune.engine.config import TrainConfig
from varprune.engine.loop import make_train_step
from varprune.engine.methods import METHODS, build_optimizer, build_regularizers, get_method
from varprune.models import create_model
from varprune.numerics.pruning import keep_mask_topk
from varprune.numerics.weights import prunable_weights
from varprune.tasks import Classification


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per timed sample")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    model_name = args.model or ("resnet18" if gpu else "resnet20")
    batch = args.batch_size or (256 if gpu else 128)
    size, channels = (32, 3) if gpu else (28, 1)
    amp = resolve_amp("auto", device)
    methods = [m.strip() for m in args.methods.split(",")]
    for m in methods:
        get_method(m)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    if gpu:
        x = x.contiguous(memory_format=torch.channels_last)
    steps = {}
    for m in methods:
        cfg = TrainConfig(method=m, model=model_name, var_lambda=1e-6, cram_sparsities=[0.5, 0.7, 0.9])
        torch.manual_seed(0)
        model = create_model(model_name, channels, 10, size).to(device)
        if gpu:
            model = model.to(memory_format=torch.channels_last)
        method = get_method(m)
        opt = build_optimizer(method, model, cfg)
        regs = build_regularizers(method, model, cfg)
        steps[m] = make_train_step(model, model, opt, regs, Classification(10), device, amp)

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    def sample(m):
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            steps[m](x, y)
        sync()
        return (time.perf_counter() - t) / args.steps

    for m in methods:  # warm-up
        sample(m)
    times = {m: [] for m in methods}
    for _ in range(args.rounds):
        for m in methods:
            times[m].append(sample(m))
    print(f"machine: {machine(device)}; load average {load_average()}")
    print(
        f"model {model_name}, batch {batch}, {channels}x{size}x{size}, amp {amp}, "
        f"{args.rounds} rounds x {args.steps} steps, median per step\n"
    )
    base = statistics.median(times["sgd"]) if "sgd" in times else None
    print("| method | ms/step | vs SGD |\n|---|---:|---:|")
    for m in methods:
        med = statistics.median(times[m])
        ratio = f"{med / base:.2f}x" if base else "—"
        print(f"| {m} | {1000 * med:.1f} | {ratio} |")

    # the top-k of one CrAM step, alone: selection over the prunable weights' magnitudes
    torch.manual_seed(0)
    model = create_model(model_name, channels, 10, size).to(device)
    flat = torch.cat([w.detach().abs().reshape(-1).float() for _, w in prunable_weights(model)])
    k = round(0.7 * flat.numel())

    def argsort_mask():
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=device)
        keep[torch.argsort(flat, stable=True)[:k]] = False
        return keep

    def timed(fn):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    assert torch.equal(keep_mask_topk(flat, k), argsort_mask())
    sel = {"keep_mask_topk": [], "stable argsort": []}
    for _ in range(args.rounds):
        sel["keep_mask_topk"].append(timed(lambda: keep_mask_topk(flat, k)))
        sel["stable argsort"].append(timed(argsort_mask))
    print(
        f"\ntop-k mask over {flat.numel():,} magnitudes at 70% (median of {args.rounds}): "
        + ", ".join(f"{name} {1000 * statistics.median(ts):.1f} ms" for name, ts in sel.items())
    )

    targets = {"mlp": 2.4, "resnet20": 2.2}
    if base and "cram+" in times and model_name in targets and not gpu:
        ratio = statistics.median(times["cram+"]) / base
        verdict = "PASS" if ratio <= targets[model_name] else "FAIL"
        print(
            f"\nJUDGED  CrAM+ step / SGD step on {model_name} (CPU) = {ratio:.2f}x  "
            f"target <= {targets[model_name]}x  {verdict}   (load average {load_average()})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
