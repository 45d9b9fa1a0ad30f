"""Device selection and mixed precision, in one place for training and evaluation."""

from __future__ import annotations

import contextlib
import os

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


# --amp auto on CPU: fp32 for now, whatever the CPU. Set True to take bf16 autocast where the CPU
# computes bf16 natively (cpu_bf16()); benchmarks/bench_precision.py measures whether that pays.
CPU_AUTO_BF16 = False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively: ``(fast, how)``.

    Fast: AMX tiles (``amx_bf16``, Sapphire Rapids and later) or AVX512-BF16
    dot products (``avx512_bf16``: Cooper Lake, Zen 4 and later), read from
    /proc/cpuinfo. Otherwise bf16 autocast still runs but is emulated (values
    converted to fp32 and back around fp32 arithmetic), usually slower than
    plain fp32. ``how`` names what was found, with torch's own vector level.
    """
    flags = _cpu_flags()
    level = torch.backends.cpu.get_cpu_capability()
    if "amx_bf16" in flags:
        return True, f"AMX: amx_bf16 flag; torch {level}"
    if "avx512_bf16" in flags:
        return True, f"AVX512-BF16: avx512_bf16 flag; torch {level}"
    if not flags:
        return False, f"emulated, presumably: no /proc/cpuinfo flags to tell; torch {level}"
    return False, f"emulated: no amx_bf16 or avx512_bf16 flag; torch {level}"


def resolve_amp(amp: str, device: torch.device) -> str:
    """bf16 autocast on GPU by default; full fp32 on CPU (bitwise-reproducible) unless CPU_AUTO_BF16."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown --amp {amp!r}; choose one of {', '.join(AMP_MODES)}")
    if amp == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if CPU_AUTO_BF16 and device.type == "cpu" and cpu_bf16()[0] else "none"
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


def available_memory(device: str | torch.device) -> int:
    """Free bytes on ``device``: torch.cuda.mem_get_info on CUDA, available RAM otherwise.

    RAM: MemAvailable of /proc/meminfo where it exists, else
    ``os.sysconf`` available pages (no psutil needed).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def fits_on_device(nbytes: int, device: str | torch.device, fraction: float = 0.5) -> bool:
    """True when ``nbytes`` take at most ``fraction`` of the device's free memory (the
    rest is left for the model, activations and the optimizer)."""
    return nbytes <= fraction * available_memory(device)
