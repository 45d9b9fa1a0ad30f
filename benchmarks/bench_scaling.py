"""Data-parallel scaling: training images/s with 1 and N processes under torchrun.

Each measurement is a real ``torchrun --nproc-per-node N -m varprune train``
(the same global ``--batch-size`` for every N, so every N computes the same
steps), in a temporary folder; images/s = training examples / the median
``epoch_time_s`` of the epochs after the first (which pays start-up and
warm-up). On the CPU each process gets ``--threads / N`` torch threads (gloo);
on GPUs each process one GPU (NCCL), N at most the number of GPUs. Rounds
alternate the order of the process counts, so a load change on a shared
machine hits them alike.

    python benchmarks/bench_scaling.py                       # CPU: 1 and 2 processes, mlp
    python benchmarks/bench_scaling.py --device cuda --processes 1,2,4,8 --model resnet18 \\
        --dataset cifar10 --batch-size 1024                  # a multi-GPU node

Judged figure: images/s with N processes / images/s with 1 (ideal: N).
No figures are recorded yet: the CPU of the development container is shared
(timings there mean little) and no multi-GPU machine has been available; fill
in the GPU figures in benchmarks/README.md when one is.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from common import load_average, machine

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(n: int, args, folder: Path) -> float:
    """Images/s of one `torchrun -m varprune train` with ``n`` processes."""
    out = folder / f"n{n}-{len(list(folder.iterdir()))}"
    threads = max(1, args.threads // n) if args.device == "cpu" else 1
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n),
            "--master-port",
            str(free_port()),
            "-m",
            "varprune",
            "train",
            "--out",
            str(out),
            "--quiet",
            "--model",
            args.model,
            "--dataset",
            args.dataset,
            "--method",
            args.method,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--limit-train",
            str(args.limit_train),
            "--limit-test",
            "100",
            "--device",
            args.device,
        ]
        + (["--data-dir", args.data_dir] if args.data_dir else [])
        + (["--sync-bn"] if args.sync_bn else [])
    )
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{n} processes failed:\n{(r.stdout + r.stderr)[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    examples = json.loads((out / "config.json").read_text())["resolved"]["train_examples"]
    times = [m["epoch_time_s"] for m in lines[1:]] or [lines[0]["epoch_time_s"]]
    return examples / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", default="1,2", help="comma-separated process counts (default 1,2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads shared by the processes (default: all cores)",
    )
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--method", default="sgd")
    p.add_argument("--batch-size", type=int, default=256, help="the global batch (default 256)")
    p.add_argument("--limit-train", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--sync-bn", action="store_true")
    args = p.parse_args()
    counts = [int(v) for v in args.processes.split(",")]
    if args.device == "cuda" and max(counts) > torch.cuda.device_count():
        sys.exit(f"{max(counts)} processes need {max(counts)} GPUs; this machine has {torch.cuda.device_count()}")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    print(f"machine: {machine(device)}; load {load_average()}")
    print(
        f"{args.model} on {args.dataset}, {args.method}, global batch {args.batch_size}, "
        f"{args.limit_train} images/epoch, {args.epochs} epochs per measurement, {args.rounds} round(s)"
    )
    results: dict[int, list[float]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in counts if r % 2 == 0 else counts[::-1]:
                results[n].append(measure(n, args, Path(tmp)))
    base = statistics.median(results[counts[0]])
    print(f"\n| processes | images/s | vs {counts[0]} | efficiency |\n|---:|---:|---:|---:|")
    for n in counts:
        ips = statistics.median(results[n])
        print(f"| {n} | {ips:.0f} | {ips / base:.2f}x | {ips / base / (n / counts[0]):.0%} |")
    print(f"load after: {load_average()}")


if __name__ == "__main__":
    main()
