"""What every benchmark prints and needs: the machine, the load, device synchronisation, JSON output."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import torch

from varprune.device import describe_device


def machine(device: torch.device) -> str:
    kind = (
        f"GPU {describe_device(device)}, CUDA {torch.version.cuda}"
        if device.type == "cuda"
        else f"CPU {describe_device(device)}"
    )
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


def write_json(path, result: dict) -> None:
    """Write a benchmark's figures to ``path`` (nothing when ``path`` is None); non-finite floats become null."""
    if not path:
        return
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean(result), indent=1) + "\n")
    os.replace(tmp, path)
