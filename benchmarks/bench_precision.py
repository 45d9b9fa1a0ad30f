"""CPU precision: fp32 against bf16 autocast (and channels_last), side by side, on the demo's setups.

Configurations (``--configs``):

* ``mlp``       the CPU demo's (``demo.SIZES["cpu"]``): BatchNorm MLP, Fashion-MNIST 1x28x28,
                batch 128, VAR lambda 1e-4;
* ``resnet20``  CIFAR-style ResNet-20 on the same data, batch 128, VAR lambda 1e-5;
* ``resnet18``, ``vgg16_bn``, ``wrn16_8``  the same data and batch, fp32 against fp32 channels_last
                only (is channels_last worth a CPU default for CNNs?).

Variants: ``fp32``, ``bf16`` (``torch.autocast("cpu", torch.bfloat16)``: matmuls and
convolutions in bf16, BatchNorm, loss and weights in fp32), and for resnet20 also
``fp32-cl`` and ``bf16-cl`` (channels_last model and inputs).

Step time: the training loop's own step (``loop.make_train_step``, method ``--method``,
default var) on real augmented Fashion-MNIST batches drawn once; the variants take
turns round by round (A B C D, B C D A, ...) after a warm-up, so a load change on
a shared machine hits them alike. Printed: median ms per step and the ratio to fp32
(< 1: bf16 is faster here), and what ``device.cpu_bf16()`` says about this CPU.

``--train``: also a short training run per variant (``varprune train`` itself, in
``--out``) and its one-shot pruning curve with BN re-tuning, to see whether bf16
changes what VAR buys. ``--epochs``/``--limit-train`` size it; the defaults are short.

    PYTHONPATH=src python benchmarks/bench_precision.py                     # step times, both configs
    PYTHONPATH=src python benchmarks/bench_precision.py --train --epochs 2  # + training and pruning curves
    PYTHONPATH=src python benchmarks/bench_precision.py --configs mlp --rounds 3 --warmup 1 --limit-train 512  # tiny

Judge on a quiet machine (load average near 0 at the start, printed); ``--threads N``
fixes torch's threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from common import load_average, machine, write_json

from varprune.data import DeviceLoader, default_data_dir, load_dataset
from varprune.device import cpu_bf16
from varprune.engine.config import TrainConfig
from varprune.engine.demo import SIZES
from varprune.engine.loop import make_train_step
from varprune.engine.methods import build_optimizer, build_regularizers, get_method
from varprune.models import create_model
from varprune.tasks import task_for

CONFIGS = {
    "mlp": dict(
        model="mlp",
        batch_size=SIZES["cpu"]["batch_size"],
        var_lambda=SIZES["cpu"]["var_lambda"],
        variants=("fp32", "bf16"),
    ),
    "resnet20": dict(
        model="resnet20", batch_size=128, var_lambda=1e-5, variants=("fp32", "bf16", "fp32-cl", "bf16-cl")
    ),
    # channels_last only (bf16 is measured on the two above): is channels_last worth a CPU default for CNNs?
    "resnet18": dict(model="resnet18", batch_size=128, var_lambda=1e-6, variants=("fp32", "fp32-cl")),
    "vgg16_bn": dict(model="vgg16_bn", batch_size=128, var_lambda=1e-6, variants=("fp32", "fp32-cl")),
    "wrn16_8": dict(model="wrn16_8", batch_size=128, var_lambda=1e-6, variants=("fp32", "fp32-cl")),
}
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97)


def variant_settings(variant: str) -> tuple[str, bool]:
    """(amp, channels_last) of a variant name."""
    return ("bf16" if variant.startswith("bf16") else "none"), variant.endswith("-cl")


def step_times(name: str, spec: dict, data, args, device) -> dict:
    info = data.info
    task = task_for(info)
    batch = args.batch_size or spec["batch_size"]
    loader = DeviceLoader(
        data.train_x[: max(batch * args.batches, batch)],
        data.train_y[: max(batch * args.batches, batch)],
        info,
        batch,
        train=True,
        device=device,
        seed=0,
        augment=task.augment,
    )
    batches = [(x, y) for x, y in loader][: args.batches]
    torch.manual_seed(0)
    init = create_model(spec["model"], info.channels, info.num_classes, info.size).state_dict()
    method = get_method(args.method)
    steps = {}
    for v in spec["variants"]:
        amp, cl = variant_settings(v)
        cfg = TrainConfig(
            model=spec["model"],
            method=args.method,
            var_lambda=spec["var_lambda"],
            batch_size=batch,
            channels_last=cl,
            amp=amp,
        )
        model = create_model(spec["model"], info.channels, info.num_classes, info.size)
        model.load_state_dict(init)
        model = model.to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        data_v = [(x.contiguous(memory_format=torch.channels_last) if cl else x, y) for x, y in batches]
        step = make_train_step(
            model, model, build_optimizer(method, model, cfg), build_regularizers(method, model, cfg), task, device, amp
        )
        steps[v] = (step, data_v)

    counter = {v: 0 for v in steps}

    def timed(v: str) -> float:
        step, data_v = steps[v]
        t = time.perf_counter()
        for _ in range(args.block):
            x, y = data_v[counter[v] % len(data_v)]
            counter[v] += 1
            step(x, y)
        return (time.perf_counter() - t) / args.block

    for _ in range(args.warmup):
        for v in steps:
            timed(v)
    times = {v: [] for v in steps}
    names = list(steps)
    for r in range(args.rounds):
        for v in names[r % len(names) :] + names[: r % len(names)]:
            times[v].append(timed(v))
    base = statistics.median(times["fp32"])
    rows = {}
    print(
        f"\n{name}: {spec['model']}, batch {batch}, method {args.method}, {args.rounds} rounds x {args.block} "
        f"step(s) after {args.warmup} warm-up rounds"
    )
    print(f"  {'variant':<10}{'median ms':>11}{'min..max ms':>18}{'vs fp32':>9}")
    for v, ts in times.items():
        m = statistics.median(ts)
        rows[v] = dict(median_ms=1e3 * m, min_ms=1e3 * min(ts), max_ms=1e3 * max(ts), ratio=m / base)
        print(f"  {v:<10}{1e3 * m:>11.1f}{f'{1e3 * min(ts):.1f}..{1e3 * max(ts):.1f}':>18}{m / base:>9.3f}")
    return rows


def train_curves(name: str, spec: dict, args, out: Path) -> dict:
    """Train each variant with `varprune train` (the library), then its pruning sweep with BNT."""
    from varprune.engine.sweep import prune_runs
    from varprune.engine.trained import ensure_run
    from varprune.report.tables import sweep_table

    runs = []
    seconds = {}
    for v in spec["variants"]:
        amp, cl = variant_settings(v)
        cfg = TrainConfig(
            dataset="fashion-mnist",
            data_dir=args.data_dir,
            model=spec["model"],
            method=args.method,
            var_lambda=spec["var_lambda"],
            epochs=args.epochs,
            batch_size=args.batch_size or spec["batch_size"],
            limit_train=args.limit_train,
            limit_test=args.limit_test,
            device="cpu",
            amp=amp,
            channels_last=cl,
            seed=0,
        )
        run = out / f"{name}-{v}"
        ensure_run(cfg, run, log=print, progress=False)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        seconds[v] = sum(r.get("epoch_time_s", 0.0) for r in rows)
        runs.append(run)
    swept = prune_runs(
        runs,
        list(SPARSITIES),
        bnt_batches=args.bnt_batches,
        bnt_batch_size=args.bnt_batch_size,
        data_dir=args.data_dir,
        device="cpu",
        log=print,
        reuse=True,
    )
    swept = [(f"{name} {v}", doc) for v, (_, doc) in zip(spec["variants"], swept)]
    print(f"\n{name}: training ({args.epochs} epochs) and one-shot pruning, per variant; accuracy % with BNT / without")
    print(sweep_table(swept))
    curves = {}
    for v, (_label, doc) in zip(spec["variants"], swept):
        curves[v] = dict(
            train_s=seconds[v],
            dense=doc.get("dense_accuracy"),
            bnt={str(r["sparsity"]): r.get("accuracy_bnt") for r in doc.get("results", [])},
            no_bnt={str(r["sparsity"]): r.get("accuracy") for r in doc.get("results", [])},
        )
        print(f"  {v:<10} training {seconds[v]:.1f} s ({seconds[v] / seconds[spec['variants'][0]]:.3f}x fp32)")
    return curves


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="mlp,resnet20", help="comma-separated: " + ", ".join(CONFIGS))
    p.add_argument("--method", default="var", help="training method of the step (default var)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the configuration's (128)")
    p.add_argument("--rounds", type=int, default=12, help="timed rounds per variant")
    p.add_argument("--block", type=int, default=2, help="steps per timed sample")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds")
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-dir", default=default_data_dir("fashion-mnist"), help="Fashion-MNIST folder")
    p.add_argument("--train", action="store_true", help="also train each variant and sweep its pruning curve")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit-train", type=int, default=10000, help="training images for --train (0: all)")
    p.add_argument("--limit-test", type=int, default=2000, help="test images for --train (0: all)")
    p.add_argument("--bnt-batches", type=int, default=20)
    p.add_argument("--bnt-batch-size", type=int, default=500)
    p.add_argument("--out", default="runs/bench_precision", help="run folders for --train")
    p.add_argument("--json", default=None, help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    args.limit_train = args.limit_train or None
    args.limit_test = args.limit_test or None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    fast, how = cpu_bf16()
    load_start = load_average()
    print("bench_precision: fp32 vs bf16 autocast (and channels_last) on CPU, interleaved in one process")
    print(f"machine   {machine(device)}")
    print(f"bf16      {'fast' if fast else 'slow'} on this CPU ({how})")
    print(f"load avg  {load_start} (1/5/15 min, at start)")
    data = load_dataset("fashion-mnist", args.data_dir)
    result = dict(
        bench="precision",
        machine=machine(device),
        bf16_fast=fast,
        bf16_how=how,
        load_start=load_start,
        method=args.method,
        steps={},
        training={},
    )
    for name in names:
        result["steps"][name] = step_times(name, CONFIGS[name], data, args, device)
    if args.train:
        out = Path(args.out)
        for name in names:
            result["training"][name] = train_curves(name, CONFIGS[name], args, out)
    result["load_end"] = load_average()
    print(f"\nload avg  {result['load_end']} at end")
    for name in names:
        steps = result["steps"][name]
        if "bf16" in steps:
            print(
                f"JUDGED  {name}: bf16 autocast step / fp32 step = {steps['bf16']['ratio']:.3f}  (< 1: bf16 pays "
                f"on this CPU; cpu_bf16() says {'fast' if fast else 'slow'})"
            )
        if "fp32-cl" in steps:
            print(f"        {name}: channels_last fp32 step / fp32 step = {steps['fp32-cl']['ratio']:.3f}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
