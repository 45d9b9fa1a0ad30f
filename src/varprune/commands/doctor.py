"""``varprune doctor``: the environment, for bug reports.

Prints versions (varprune, Python, torch and the libraries varprune uses),
the compute devices torch sees and the one ``--device auto`` picks, and for
every dataset where it was looked for and whether its files were found.
Nothing is downloaded and no dataset file is read: only their presence is
checked, so the report is instant even for large datasets.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from varprune import __version__

LIBRARIES = (
    "torch",
    "torchvision",
    "numpy",
    "safetensors",
    "tqdm",
    "matplotlib",
    "scipy",
    "nibabel",
    "pillow",
    "timm",
    "monai",
    "transformers",
    "tokenizers",
    "accelerate",
    "lightning",
    "hypothesis",
    "pytest",
)
# what each optional package enables, and how to get it: doctor says it beside a package that is missing
ENABLES = {
    "scipy": "the svhn dataset; pip install 'varprune[svhn]'",
    "timm": "--model timm:NAME; pip install 'varprune[timm]'",
    "transformers": "language models (gpt2, llama, bert, --model hf:DIR), text datasets, demo --task lm, "
    "export --format hf, the Trainer VarCallback; pip install 'varprune[hf]'",
    "tokenizers": "text datasets (the byte-level BPE) and demo --task lm; pip install 'varprune[hf]'",
    "accelerate": "the Hugging Face Trainer (its VarCallback); pip install 'varprune[hf]'",
    "lightning": "the Lightning VarCallback; pip install 'varprune[lightning]'",
    "hypothesis": "some tests; pip install 'varprune[test]'",
    "pytest": "the tests; pip install 'varprune[test]'",
}
IMPORTS = {"torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "torchvision": "torchvision"}


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _torch_lines() -> list[str]:
    import torch

    from varprune.device import describe_device, resolve_device

    lines = [
        f"torch:          {torch.__version__} ({Path(torch.__file__).parent})",
        f"torch threads:  {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op "
        f"({os.cpu_count()} CPUs)",
    ]
    cuda = torch.cuda.is_available()
    lines.append(
        f"CUDA:           {'available' if cuda else 'not available'} (torch built with CUDA "
        f"{torch.version.cuda or 'none'}, cuDNN {torch.backends.cudnn.version() if cuda else 'n/a'})"
    )
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(
                f"  cuda:{i}        {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                f"compute capability {props.major}.{props.minor}, bf16 "
                f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"
            )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        lines.append("MPS:            available (varprune uses cpu or cuda)")
    from varprune.device import cpu_bf16

    fast, how = cpu_bf16()
    lines.append(f"bf16 on CPU:    {'fast' if fast else 'slow'} ({how})")
    device = resolve_device("auto")
    lines.append(f"--device auto:  {device} ({describe_device(device)})")
    return lines


def _import_lines() -> list[str]:
    """Whether the libraries varprune cannot run without import, with the error if not."""
    import importlib

    lines = []
    for name, module in IMPORTS.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken install is what doctor exists to report
            first = (str(e).strip().splitlines() or [""])[0][:120]
            lines.append(
                f"import {module}: FAILS ({type(e).__name__}: {first}); reinstall it: "
                f"pip install --force-reinstall {name}"
            )
    return lines


def _dataset_lines(data_dir: str | os.PathLike | None) -> list[str]:
    from varprune.data import DATASETS, default_data_dir, locate_dataset

    lines = []
    width = max(map(len, DATASETS)) + 1  # the longest name (text-classification) still leaves a space
    for name in sorted(DATASETS):
        root = data_dir if data_dir is not None else default_data_dir(name)
        where = locate_dataset(name, root)
        if where.complete:
            folders = sorted({str(p.parent) for p in where.found})
            lines.append(f"  {name:<{width}} found in {', '.join(folders)} ({len(where.found)} files)")
        elif where.found:
            lines.append(
                f"  {name:<{width}} incomplete in {Path(root).absolute()} (missing {', '.join(where.missing)}; "
                f"expected {DATASETS[name].layout})"
            )
        else:
            lines.append(f"  {name:<{width}} not found in {Path(root).absolute()} (expected {DATASETS[name].layout})")
    return lines


def report(data_dir: str | os.PathLike | None = None) -> str:
    """The doctor report as text (one fact per line)."""
    lines = [
        f"varprune:       {__version__} ({Path(__file__).resolve().parent.parent})",  # the package, not commands/
        f"python:         {sys.version.split()[0]} ({sys.executable})",
        f"platform:       {platform.platform()}",
    ]
    for lib in LIBRARIES:
        if lib != "torch":
            version = _version(lib)
            missing = version == "not installed" and lib in ENABLES
            lines.append(f"{lib + ':':<16}{version}" + (f" (without it, no {ENABLES[lib]})" if missing else ""))
    broken = _import_lines()
    lines += broken
    if broken:
        lines.append("datasets:       not checked (the imports above fail)")
        return "\n".join(lines) + "\n"
    try:
        lines += _torch_lines()
    except Exception as e:  # a broken CUDA setup is exactly what doctor must report, not die of
        lines.append(f"torch devices:  error {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:120]}")
    env = {k: os.environ[k] for k in ("VARPRUNE_DATA", "CUDA_VISIBLE_DEVICES") if k in os.environ}
    lines.append(f"environment:    {', '.join(f'{k}={v}' for k, v in env.items()) or 'VARPRUNE_DATA unset'}")
    lines.append(
        "datasets"
        + (f" (--data-dir {data_dir}):" if data_dir is not None else " (default folders; --data-dir overrides):")
    )
    lines += _dataset_lines(data_dir)
    return "\n".join(lines) + "\n"


def add_parser(sub, epilog: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "doctor",
        help="print the environment (versions, devices, datasets) for bug reports",
        description="Print versions, the devices torch sees and where each dataset was looked "
        "for and found. Reads no dataset file; paste the output into bug reports.",
    )
    p.add_argument("--data-dir", help="look for the datasets here instead of their default folders")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    print(report(args.data_dir), end="")
    return 0
