"""What every benchmark prints and needs: the machine, the load, device synchronisation."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch  # noqa: E402

from varprune.device import describe_device  # noqa: E402


def machine(device: torch.device) -> str:
    kind = f"GPU {describe_device(device)}, CUDA {torch.version.cuda}" if device.type == "cuda" else \
        f"CPU {describe_device(device)}"
    return f"{kind}, torch {torch.__version__}"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_device_args(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def setup_device(args) -> torch.device:
    """Apply --threads and resolve --device the way `varprune train` does."""
    from varprune.device import resolve_device
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)
