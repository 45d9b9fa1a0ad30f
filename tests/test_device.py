"""--amp auto on CPU and the bf16 capability line of `varprune doctor`."""

import torch

from varprune import device as dev
from varprune.cli import main


def _flags():
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def test_cpu_bf16_follows_the_cpu_flags():
    fast, how = dev.cpu_bf16()
    flags = _flags()
    assert fast == bool({"amx_bf16", "avx512_bf16"} & flags)
    assert torch.backends.cpu.get_cpu_capability() in how


def test_amp_auto_stays_fp32_on_cpu_unless_switched_on(monkeypatch):
    cpu = torch.device("cpu")
    assert dev.resolve_amp("auto", cpu) == "none"
    assert dev.resolve_amp("bf16", cpu) == "bf16"
    monkeypatch.setattr(dev, "CPU_AUTO_BF16", True)
    assert dev.resolve_amp("auto", cpu) == ("bf16" if dev.cpu_bf16()[0] else "none")


def test_doctor_says_whether_bf16_is_fast(capsys):
    assert main(["doctor"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("bf16 on CPU:"))
    assert line.split()[3] == ("fast" if dev.cpu_bf16()[0] else "slow")
