"""Device selection and mixed precision, in one place for training and evaluation."""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("auto", "bf16", "none")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def resolve_amp(amp: str, device: torch.device) -> str:
    """bf16 autocast on GPU by default; full fp32 on CPU (bitwise-reproducible)."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown --amp {amp!r}; choose one of {', '.join(AMP_MODES)}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    return amp


def autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"
